"""The control API's client, on aiohttp: :class:`AsyncHostClient` for asyncio code and
:class:`HostClient`, a synchronous facade, for the CLI, the demo and worker threads.

Every request carries the cluster's bearer token and has a deadline.  A request that never
reached the host (connection refused, DNS failure) is retried a few times with back-off; a
GET is also retried when the connection broke mid-answer, since it changes nothing.  An
answer with an error status becomes an :class:`~vmferry.errors.ApiError` with the host's
``kind``, ``message`` and ``step``; a host that cannot be reached a
:class:`~vmferry.errors.HostError`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aiohttp

from vmferry.errors import ApiError, ConfigError, HostError
from vmferry.host.tls import explain

#: attempts for a request that did not reach the host
RETRIES = 3
BACKOFF_S = 0.2
CONNECT_TIMEOUT_S = 5.0
#: the most of an error body kept in an ApiError's message
MAX_ERROR_CHARS = 2000


def error_from_body(status: int, body: bytes, reason: str) -> ApiError:
    """An ApiError from an error answer: ``{"error": {kind, message, step}}``, an older
    ``{"error": message}``, or anything else (then the HTTP reason)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ApiError(status, reason)
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return ApiError(
            status,
            str(err.get("message", reason))[:MAX_ERROR_CHARS],
            str(err.get("kind", "")),
            str(err.get("step", "") or ""),
        )
    if isinstance(err, str):
        return ApiError(status, err[:MAX_ERROR_CHARS])
    return ApiError(status, reason)


class AsyncHostClient:
    """One host's control API.  Use as ``async with AsyncHostClient(url, token) as c``."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        #: the client side of mutual TLS (presents our certificate) for https:// hosts
        self.tls = tls
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncHostClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.tls) if self.tls is not None else None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout, connect=CONNECT_TIMEOUT_S),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request_bytes(self, method: str, path: str, body: Any = None) -> bytes:
        """The raw answer body; ApiError for an error status, HostError if unreachable."""
        if self._session is None:
            raise HostError("AsyncHostClient used outside 'async with'")
        try:
            data = None if body is None else json.dumps(body, allow_nan=False).encode()
        except ValueError as exc:  # NaN or Infinity: JSON has no such numbers
            raise ConfigError(f"request to {path}: {exc}") from exc
        last: Exception | None = None
        for attempt in range(RETRIES):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                async with self._session.request(
                    method, f"{self.url}{path}", data=data,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    raw = await resp.read()
                    if resp.status >= 400:
                        raise error_from_body(resp.status, raw, resp.reason or "error")
                    return raw
            except aiohttp.ClientSSLError as exc:  # the TLS handshake failed: no retry
                cause = getattr(exc, "certificate_error", None) or exc.os_error
                raise HostError(f"cannot reach host at {self.url}: "
                                f"{explain(cause, self.url, server=False)}") from exc
            except aiohttp.ClientConnectorError as exc:  # nothing reached the host
                last = exc
            except aiohttp.ServerDisconnectedError as exc:
                last = exc
                if self.url.startswith("http://"):  # a TLS host drops a plaintext client
                    raise HostError(f"cannot reach host at {self.url}: it closed the "
                                    "connection (does it serve TLS? use its https:// URL "
                                    "and --tls-dir)") from exc  # fmt: skip
                if method != "GET":
                    break
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = exc
                if method != "GET":
                    break
            except ValueError as exc:  # a URL aiohttp cannot use
                raise HostError(f"cannot reach host at {self.url}: {exc}") from exc
        reason = "timed out" if isinstance(last, TimeoutError) else str(last)
        raise HostError(f"cannot reach host at {self.url}: {reason}") from last

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        raw = await self.request_bytes(method, path, body)
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise HostError(f"host at {self.url} answered {path} with no JSON") from exc

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, body if body is not None else {})

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)


class HostClient:
    """A synchronous facade: each call runs one :class:`AsyncHostClient` request on its
    own event loop (call it from threads that run no loop: the CLI, workers, tests)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.tls = tls

    def _run(self, method: str, path: str, body: Any, raw: bool) -> Any:
        async def call() -> Any:
            async with AsyncHostClient(self.url, self.token, self.timeout, self.tls) as c:
                if raw:
                    return await c.request_bytes(method, path, body)
                return await c.request(method, path, body)

        return asyncio.run(call())

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return self._run(method, path, body, raw=False)

    def request_bytes(self, method: str, path: str, body: Any = None) -> bytes:
        """The raw response body (for endpoints that return files, e.g. a .dtb)."""
        out: bytes = self._run(method, path, body, raw=True)
        return out

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
