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
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import struct
from collections.abc import Sequence
from typing import Any

from vmferry.errors import PeerError
from vmferry.migration.stream import StreamDecoder
from vmferry.migration.stream.records import Buffer

_LEN = struct.Struct(">I")
MAX_FRAME = 1024 * 1024


def send_frame(sock: socket.socket, kind: str, **fields: Any) -> None:
    body = json.dumps({"type": kind, **fields}).encode()
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise PeerError(f"connection closed while reading {what}")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size, "a control frame"))
    if n > MAX_FRAME:
        raise PeerError(f"control frame of {n} bytes is over the {MAX_FRAME} limit")
    try:
        msg = json.loads(_recv_exact(sock, n, "a control frame"))
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


def send_buffers(sock: socket.socket, buffers: Sequence[Buffer]) -> int:
    """sendmsg() the buffers completely (TLS: one sendall each); returns bytes sent."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg: coalesce small buffers into records
        return _send_tls(sock, pending)
    total = 0
    while pending:
        sent = sock.sendmsg(pending[:64])
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
