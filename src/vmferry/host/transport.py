"""The migration connection: length-prefixed JSON control frames around the raw stream.

::

    source                                  destination
      HELLO {token, stream_version}  ---->
                                     <----  WELCOME {host, capabilities} | REJECT {reason}
      <vmferry stream bytes ...>     ---->
                                     <----  LOADED {ack} | ERROR {step, reason}
      COMMIT {}                      ---->
                                     <----  RESUMED {resume_ms}

COMMIT is the point of no return.  Before the destination receives it, it runs nothing and
discards the staging VM on any failure, and the source resumes its VM.  After the source
sent it, the source never resumes on its own: the destination may already run the guest,
and a VM must not run twice.

A control frame is a big-endian u32 length (at most 1 MiB) and a UTF-8 JSON object with
a ``type`` key.  The destination may send ERROR at any time; the source looks for it
between batches.

Waiting is bounded by the caller: :func:`send_buffers` and :func:`recv_frame` take an
``on_stall(seconds)`` callback.  With it the socket is polled in short slices and the
callback learns, after every slice that moved nothing, how long the peer has made no
progress; it raises to give up (a stalled peer, an operator's cancel).

The listener reads every connection's HELLO in one thread (:func:`serve_handshakes`),
with an overall deadline from the moment it accepted the connection and a cap on how
many may wait: an idle or trickling connection costs a file descriptor, never a thread,
and cannot hold the listener open.  Only a connection with a complete HELLO gets a
worker thread.
"""

from __future__ import annotations

import contextlib
import json
import select
import selectors
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import PeerError
from vmferry.migration.stream import StreamDecoder
from vmferry.migration.stream.records import Buffer

_LEN = struct.Struct(">I")
MAX_FRAME = 1024 * 1024


#: how often a bounded wait (``on_stall``) looks up from the socket, seconds
POLL_S = 0.2

#: the bound on one TLS send to a peer that takes nothing (TLS sends are not polled)
TLS_SEND_TIMEOUT_S = 10.0

#: called with the seconds the peer has made no progress; raises to stop waiting
OnStall = Callable[[float], None]


def send_frame(sock: socket.socket, kind: str, *, on_stall: OnStall | None = None,
               **fields: Any) -> None:
    body = json.dumps({"type": kind, **fields}).encode()
    send_buffers(sock, [_LEN.pack(len(body)) + body], on_stall)


class _Waiter:
    """Polls a socket in :data:`POLL_S` slices and reports stalls to ``on_stall``."""

    def __init__(self, sock: socket.socket, on_stall: OnStall | None) -> None:
        self.on_stall = on_stall
        if on_stall is not None:
            sock.settimeout(POLL_S)
        self.last = time.monotonic()

    def progress(self) -> None:
        self.last = time.monotonic()

    def stalled(self, exc: TimeoutError) -> None:
        if self.on_stall is None:
            raise exc
        self.on_stall(time.monotonic() - self.last)


def _recv_exact(sock: socket.socket, n: int, what: str, waiter: _Waiter) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError as exc:
            waiter.stalled(exc)
            continue
        if k == 0:
            raise PeerError(f"connection closed while reading {what}")
        got += k
        waiter.progress()
    return bytes(buf)


def recv_frame(sock: socket.socket, on_stall: OnStall | None = None) -> dict[str, Any]:
    waiter = _Waiter(sock, on_stall)
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size, "a control frame", waiter))
    if n > MAX_FRAME:
        raise PeerError(f"control frame of {n} bytes is over the {MAX_FRAME} limit")
    try:
        msg = json.loads(_recv_exact(sock, n, "a control frame", waiter))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PeerError(f"control frame is not JSON: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise PeerError("control frame without a type")
    return msg


def readable(sock: socket.socket) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    r, _, _ = select.select([sock], [], [], 0)
    return bool(r)


def send_buffers(
    sock: socket.socket, buffers: Sequence[Buffer], on_stall: OnStall | None = None
) -> int:
    """sendmsg() the buffers completely (TLS: one sendall each); returns bytes sent.
    Over TLS a stalled peer is not polled (a TLS record cannot be half-written and
    retried): each sendall gets :data:`TLS_SEND_TIMEOUT_S` instead."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg: coalesce small buffers into records
        if on_stall is not None:
            on_stall(0.0)  # a cancel still takes effect between sends
            sock.settimeout(TLS_SEND_TIMEOUT_S)
        return _send_tls(sock, pending)
    total = 0
    waiter = _Waiter(sock, on_stall)
    while pending:
        try:
            sent = sock.sendmsg(pending[:64])
        except TimeoutError as exc:
            waiter.stalled(exc)
            continue
        waiter.progress()
        total += sent
        while sent:
            head = pending[0]
            if sent >= len(head):
                sent -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[sent:]
                sent = 0
    return total


#: buffers smaller than this are copied together before they go into a TLS record
_COALESCE = 16 * 1024


def _send_tls(sock: ssl.SSLSocket, views: list[memoryview]) -> int:
    small = bytearray()
    for view in views:
        if view.nbytes < _COALESCE:
            small += view
            if len(small) < _COALESCE:
                continue
        if small:
            sock.sendall(small)
            small = bytearray()
        if view.nbytes >= _COALESCE:
            sock.sendall(view)
    if small:
        sock.sendall(small)
    return sum(v.nbytes for v in views)


def recv_into_decoder(sock: socket.socket, decoder: StreamDecoder) -> int:
    """One recv straight into the decoder's buffer; returns bytes (0 = EOF)."""
    view = decoder.writable()
    n = sock.recv_into(view)
    decoder.wrote(n)
    return n


# --- the listener's handshake gate -------------------------------------------------------

#: a connection must have sent its whole HELLO within this many seconds of being accepted
HANDSHAKE_DEADLINE_S = 10.0
#: connections waiting for their HELLO at once; more are closed as they arrive
MAX_PENDING = 64
#: the largest HELLO frame
MAX_HELLO = 64 * 1024


@dataclass
class _Pending:
    conn: socket.socket
    addr: Any
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    #: False while a TLS handshake is still under way
    secure: bool = True


def _parse_hello(buf: bytearray) -> dict[str, Any] | str | None:
    """The HELLO frame in ``buf``: the message, a refusal reason, or None (need more)."""
    if len(buf) < _LEN.size:
        return None
    (n,) = _LEN.unpack_from(buf)
    if n > MAX_HELLO:
        return f"hello frame of {n} bytes is over the {MAX_HELLO} limit"
    if len(buf) < _LEN.size + n:
        return None
    if len(buf) > _LEN.size + n:
        return "data sent before the welcome"
    try:
        msg = json.loads(bytes(buf[_LEN.size:_LEN.size + n]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "hello frame is not JSON"
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return "hello frame without a type"
    return msg


def serve_handshakes(
    listener: socket.socket,
    stopping: Callable[[], bool],
    on_hello: Callable[[socket.socket, Any, dict[str, Any]], None],
    on_refuse: Callable[[socket.socket, Any, str], None],
    deadline_s: float = HANDSHAKE_DEADLINE_S,
    max_pending: int = MAX_PENDING,
    tls: ssl.SSLContext | None = None,
    tls_error: Callable[[BaseException, Any], str] | None = None,
) -> None:
    """Accept connections and read their HELLO frames, all in this one thread: a
    connection that has not sent its whole HELLO within ``deadline_s`` (however slowly it
    trickles bytes) or sends a bad one goes to ``on_refuse``; one with a HELLO goes, in
    blocking mode, to ``on_hello``, which owns it from then on.  At most ``max_pending``
    connections wait at once.  With ``tls`` (a server context) the TLS handshake runs here
    as well, non-blocking and within the same deadline; ``tls_error`` words its failures.
    Returns when ``stopping()`` or the listener is closed."""
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    pending: dict[int, _Pending] = {}

    def drop(p: _Pending, reason: str | None) -> None:
        sel.unregister(p.conn)
        del pending[p.conn.fileno()]
        if reason is not None:
            on_refuse(p.conn, p.addr, reason)

    try:
        while not stopping():
            try:
                events = sel.select(timeout=0.25)
            except (OSError, ValueError):
                return
            for key, _ in events:
                if key.data is None:
                    if not _accept(listener, sel, pending, deadline_s, max_pending, on_refuse,
                                   tls):
                        return
                    continue
                p = key.data
                if not p.secure:
                    done = _tls_step(p, sel)
                    if isinstance(done, BaseException):
                        drop(p, tls_error(done, p.addr) if tls_error else
                             f"TLS handshake failed: {done}")
                    if done is not True:
                        continue
                try:
                    want = MAX_HELLO + _LEN.size - len(p.buf)
                    chunk = p.conn.recv(want)
                    while (isinstance(p.conn, ssl.SSLSocket) and p.conn.pending()
                           and 0 < len(chunk) < want):
                        chunk += p.conn.recv(want - len(chunk))
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    drop(p, "connection closed before a complete hello")
                    continue
                p.buf += chunk
                hello = _parse_hello(p.buf)
                if isinstance(hello, str):
                    drop(p, hello)
                elif hello is not None:
                    drop(p, None)
                    p.conn.setblocking(True)
                    on_hello(p.conn, p.addr, hello)
            now = time.monotonic()
            for p in [p for p in pending.values() if p.deadline < now]:
                drop(p, f"no complete hello within {deadline_s:g} s")
    finally:
        for p in list(pending.values()):
            with contextlib.suppress(OSError):
                p.conn.close()
        sel.close()


def _tls_step(p: _Pending, sel: selectors.BaseSelector) -> bool | BaseException:
    """Advance a pending connection's TLS handshake: True once done, False to wait for
    the socket, or the error that ended it."""
    assert isinstance(p.conn, ssl.SSLSocket)
    try:
        p.conn.do_handshake()
    except ssl.SSLWantReadError:
        sel.modify(p.conn, selectors.EVENT_READ, p)
        return False
    except ssl.SSLWantWriteError:
        sel.modify(p.conn, selectors.EVENT_READ | selectors.EVENT_WRITE, p)
        return False
    except (ssl.SSLError, OSError) as exc:
        return exc
    sel.modify(p.conn, selectors.EVENT_READ, p)
    p.secure = True
    return True


def _accept(
    listener: socket.socket,
    sel: selectors.BaseSelector,
    pending: dict[int, _Pending],
    deadline_s: float,
    max_pending: int,
    on_refuse: Callable[[socket.socket, Any, str], None],
    tls: ssl.SSLContext | None = None,
) -> bool:
    """Take one new connection into ``pending``; False if the listener is gone."""
    try:
        conn, addr = listener.accept()
    except BlockingIOError:
        return True
    except OSError:
        return False
    conn.setblocking(False)
    if len(pending) >= max_pending:
        on_refuse(conn, addr, f"{max_pending} connections already wait for their hello")
        return True
    if tls is not None:
        try:
            conn = tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            on_refuse(conn, addr, f"TLS setup failed: {exc}")
            return True
    p = _Pending(conn, addr, time.monotonic() + deadline_s, secure=tls is None)
    pending[conn.fileno()] = p
    sel.register(conn, selectors.EVENT_READ, p)
    return True
