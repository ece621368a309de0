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
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
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
