"""Host events: a bus the daemon's threads publish to, served as server-sent events.

Theory of operation
-------------------
Anything that changes what an operator sees -- a job's status or statistics, a VM's
runstate, a refused connection -- is published on the daemon's :class:`EventBus` as an
:class:`Event` (a kind and a JSON object).  Publishing is cheap and thread-safe: the
migration worker threads call it.  Each subscriber is an asyncio queue on the control API's
event loop; the bus hands it events with ``call_soon_threadsafe``.  A subscriber that falls
behind loses its oldest events (a job event carries the whole job, so the newest one is
enough), never blocks a publisher.

``GET /v1/events/stream`` (``?job=ID`` or ``?vm=NAME`` to filter) serves the bus as
``text/event-stream``: first the current state of what was asked for (so a late subscriber
still sees a job that already finished), then every event as it happens, and a comment
line every :data:`HEARTBEAT_S` seconds so that both ends notice a dead connection.

:func:`stream_events` is the matching blocking client the CLI uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import HostError
from vmferry.host.client import error_from_body

HEARTBEAT_S = 1.0
QUEUE_SIZE = 512
#: kinds of event; "host" carries log entries such as refused migration connections
KINDS = ("job", "vm", "host")


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    data: dict[str, Any]
    at: float = field(default_factory=time.time)

    def sse(self) -> bytes:
        """The event in the ``text/event-stream`` format."""
        body = json.dumps(self.data, default=str, separators=(",", ":"))
        return f"id: {self.seq}\nevent: {self.kind}\ndata: {body}\n\n".encode()


class _Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)

    def offer(self, event: Event | None) -> None:
        """On the subscriber's loop: queue the event, dropping the oldest if full."""
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(event)


class EventBus:
    """Thread-safe fan-out of :class:`Event` to asyncio subscribers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._subs: list[_Subscriber] = []
        self._listeners: list[Callable[[Event], None]] = []
        self.closed = False

    def publish(self, kind: str, data: Mapping[str, Any]) -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        with self._lock:
            self._seq += 1
            event = Event(self._seq, kind, dict(data))
            subs, listeners = list(self._subs), list(self._listeners)
        for sub in subs:
            self._deliver(sub, event)
        for listener in listeners:
            listener(event)
        return event

    def _deliver(self, sub: _Subscriber, event: Event | None) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub.offer, event)
        except RuntimeError:  # its loop is closed: it will never read again
            self.unsubscribe(sub)

    def subscribe(self) -> _Subscriber:
        """A queue on the running event loop that receives every later event."""
        sub = _Subscriber(asyncio.get_running_loop())
        with self._lock:
            self._subs.append(sub)
        if self.closed:
            sub.offer(None)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subs.remove(sub)

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        """Call ``fn`` synchronously, in the publisher's thread, for every event."""
        with self._lock:
            self._listeners.append(fn)

    def close(self) -> None:
        """End every subscription (the daemon is stopping)."""
        with self._lock:
            self.closed = True
            subs = list(self._subs)
        for sub in subs:
            self._deliver(sub, None)


def matches(event: Event, job: str | None, vm: str | None) -> bool:
    """Whether an event concerns the job or VM a stream was asked for."""
    if job is not None:
        return event.kind == "job" and event.data.get("id") == job
    if vm is not None:
        return event.data.get("vm", event.data.get("name")) == vm
    return True


# --- the blocking client -------------------------------------------------------------------


def stream_events(url: str, *, token: str | None = None, job: str | None = None,
                  vm: str | None = None, stall_s: float = 10.0,
                  tls: ssl.SSLContext | None = None) -> Iterator[Event]:
    """Events from a host's ``/v1/events/stream``, as they happen, until the host closes
    the stream (``token``: the control API's bearer token).  HostError if it cannot be
    reached or goes quiet for ``stall_s`` seconds (it sends a heartbeat every second);
    ApiError for an HTTP error."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode({k: v for k, v in (("job", job), ("vm", vm)) if v})
    host = parts.hostname or "127.0.0.1"
    conn: http.client.HTTPConnection
    if parts.scheme == "https":  # mutual TLS: the client certificate in ``tls``
        conn = http.client.HTTPSConnection(host, parts.port or 443, timeout=stall_s,
                                           context=tls)
    else:
        conn = http.client.HTTPConnection(host, parts.port or 80, timeout=stall_s)
    try:
        try:
            conn.request("GET", f"/v1/events/stream{'?' + query if query else ''}",
                         headers={"Accept": "text/event-stream",
                                  **({"Authorization": f"Bearer {token}"} if token else {})})
            resp = conn.getresponse()
        except OSError as exc:
            raise HostError(f"cannot reach host at {url}: {exc.strerror or exc}") from exc
        if resp.status != 200:
            raise error_from_body(resp.status, resp.read(), resp.reason or "error")
        yield from _parse(resp, url)
    finally:
        conn.close()


def _parse(resp: http.client.HTTPResponse, url: str) -> Iterator[Event]:
    fields: dict[str, str] = {}
    while True:
        try:
            raw = resp.readline()
        except TimeoutError as exc:
            raise HostError(f"the event stream of {url} went quiet") from exc
        except OSError as exc:
            raise HostError(f"the event stream of {url} broke: {exc}") from exc
        if not raw:
            return
        line = raw.decode().rstrip("\r\n")
        if line.startswith(":"):
            continue
        if line:
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")
            continue
        if "data" in fields:
            yield Event(int(fields.get("id", "0") or 0), fields.get("event", "message"),
                        json.loads(fields["data"]))
        fields = {}
