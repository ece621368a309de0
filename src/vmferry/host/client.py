"""A small synchronous client for the control API (used by the CLI and the demo)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from vmferry.errors import ApiError, HostError


class HostClient:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self.request_bytes(method, path, body) or b"null")

    def request_bytes(self, method: str, path: str, body: Any = None) -> bytes:
        """The raw response body (for endpoints that return files, e.g. a .dtb)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}", data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                out: bytes = resp.read()
                return out
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            raise ApiError(exc.code, str(message)) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HostError(f"cannot reach host at {self.url}: {reason}") from exc

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
