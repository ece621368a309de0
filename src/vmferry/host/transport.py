"""The migration connection on a socket: the channel protocol driven over TCP or TLS.

The protocol itself -- typed frames, one transition table for both roles, the rules at
the point of no return -- is sans-IO in :mod:`vmferry.migration.channel` (see
docs/channel.md).  This module moves its bytes:

* a :class:`Link` carries bytes with bounded waits: :class:`SocketLink` over a TCP or
  TLS socket (``sendmsg`` of header and payload views; over TLS, which has no
  ``sendmsg``, one ``sendall`` per coalesced run of buffers), and
  :class:`vmferry.testing.pipes.PipeLink` over in-memory pipes for protocol tests;
* a :class:`Channel` pairs a link with a :class:`~vmferry.migration.channel.Connection`:
  it sends events, waits for the peer's next one, and on the destination reads DATA
  payloads straight into the stream decoder's buffer (``Connection.direct_payload``);
* :func:`serve_handshakes` is the listener's handshake gate.

Waiting is bounded by the caller: :meth:`Channel.send` and :meth:`Channel.next_event`
take an ``on_stall(seconds)`` callback.  With it the link is polled in short slices and
the callback learns, after every slice that moved nothing, how long the peer has made no
progress; it raises to give up (a stalled peer, an operator's cancel).

The listener reads every connection's first frame in one thread (:func:`serve_handshakes`),
each into its own destination :class:`~vmferry.migration.channel.Connection`, with an
overall deadline from the moment it accepted the connection and a cap on how many may
wait: an idle or trickling connection costs a file descriptor, never a thread, and cannot
hold the listener open.  Only a connection whose first frame (HELLO, or ABORT carrying a
token) arrived whole and legal gets a worker thread; anything else is refused with a
typed REJECT where the peer speaks the protocol.
"""

from __future__ import annotations

import contextlib
import fcntl
import select
import selectors
import socket
import ssl
import struct
import sys
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmferry.errors import RemoteChannelError
from vmferry.migration.channel import (
    NEED_DATA,
    Abort,
    Closed,
    Connection,
    Data,
    ErrorKind,
    Event,
    Hello,
    Role,
    Status,
)
from vmferry.migration.channel.frames import HEADER, MAX_DATA
from vmferry.migration.stream import StreamDecoder
from vmferry.migration.stream.records import Buffer, Record

#: how often a bounded wait (``on_stall``) looks up from the socket, seconds
POLL_S = 0.2

#: the bound on one TLS send to a peer that takes nothing (TLS sends are not polled)
TLS_SEND_TIMEOUT_S = 10.0

#: called with the seconds the peer has made no progress; raises to stop waiting
OnStall = Callable[[float], None]


class Link(Protocol):
    """A byte connection with bounded waits (a socket, or an in-memory pipe)."""

    def send(self, buffers: Sequence[Buffer], on_stall: OnStall | None = None) -> int:
        """Send every byte of ``buffers``; OSError if the connection broke."""
        ...

    def recv_into(self, view: memoryview, on_stall: OnStall | None = None) -> int:
        """Wait for at least one byte (0: end of file) and read it into ``view``."""
        ...

    def readable(self) -> bool:
        """Whether a read would return at once (bytes or end of file)."""
        ...

    def queued(self) -> int:
        """Bytes sent but not yet taken by the peer (0 where unknown)."""
        ...

    def close(self) -> None: ...


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


def send_queued(sock: socket.socket) -> int:
    """Bytes in ``sock``'s send queue not yet sent or not yet acknowledged (SIOCOUTQ);
    0 for a closed socket."""
    with contextlib.suppress(OSError, ValueError):
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return max(0, int.from_bytes(raw, sys.byteorder, signed=True))
    return 0


#: struct tcp_info: eight u8 fields, then u32 fields of which tcpi_rtt (the smoothed RTT)
#: is the 16th; tcpi_min_rtt (Linux 4.6) follows four u64 and three u32 later (us each)
_TCPI_U32 = struct.Struct("=I")
_TCPI_RTT_OFFSET = 8 + 15 * 4
_TCPI_MIN_RTT_OFFSET = 8 + 24 * 4 + 4 * 8 + 3 * 4
_TCP_INFO_SIZE = 256


def tcp_rtt_s(sock: socket.socket) -> float | None:
    """The round-trip time of TCP connection ``sock`` as the kernel measured it, seconds:
    its minimum RTT (``tcpi_min_rtt``), which a request and its reply take.  The smoothed
    RTT (``tcpi_rtt``, the fallback on kernels without the minimum) also counts the
    receiver's delayed ACKs: on a connection that carries a small frame now and then it
    reads 4-5 ms where a frame's reply comes in 0.01 ms.  None where there is no TCP
    RTT (not TCP, closed)."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None or sock.type != socket.SOCK_STREAM:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_SIZE)
    except (OSError, ValueError):
        return None
    for offset in (_TCPI_MIN_RTT_OFFSET, _TCPI_RTT_OFFSET):
        if len(raw) >= offset + _TCPI_U32.size:
            rtt_us: int = _TCPI_U32.unpack_from(raw, offset)[0]
            return rtt_us / 1e6
    return None


class SocketLink:
    """A :class:`Link` over a blocking TCP or TLS socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, buffers: Sequence[Buffer], on_stall: OnStall | None = None) -> int:
        return send_buffers(self.sock, buffers, on_stall)

    def recv_into(self, view: memoryview, on_stall: OnStall | None = None) -> int:
        waiter = _Waiter(self.sock, on_stall)
        while True:
            try:
                return self.sock.recv_into(view)
            except TimeoutError as exc:
                waiter.stalled(exc)

    def readable(self) -> bool:
        return readable(self.sock)

    def queued(self) -> int:
        return send_queued(self.sock)

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def data_frames(buffers: Sequence[Buffer]) -> list[Data]:
    """Stream buffers as DATA events of at most ``MAX_DATA`` bytes each (views, no
    copies): a batch with a large device state may exceed one frame."""
    frames: list[Data] = []
    run: list[Buffer] = []
    size = 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        while view.nbytes:
            take = min(view.nbytes, MAX_DATA - size)
            run.append(view[:take])
            size += take
            view = view[take:]
            if size == MAX_DATA:
                frames.append(Data(run))
                run, size = [], 0
    if run:
        frames.append(Data(run))
    return frames


class Channel:
    """One end of the channel on a :class:`Link` (see the module docstring)."""

    def __init__(self, link: Link, conn: Connection) -> None:
        self.link, self.conn = link, conn
        self._buf = bytearray(1 << 16)

    def send(self, event: Event, on_stall: OnStall | None = None,
             damage: Callable[[list[Buffer]], list[Buffer]] | None = None) -> None:
        """``event`` on the wire; if the write fails the connection learns that the
        frame did not go (``Connection.send_failed``).  ``damage`` rewrites the bytes
        first (fault injection: a damaged COMMIT)."""
        buffers = self.conn.send(event)
        if damage is not None:
            buffers = damage(buffers)
        try:
            self.link.send(buffers, on_stall)
        except BaseException:
            self.conn.send_failed()
            raise

    def send_stream(self, buffers: Sequence[Buffer], on_stall: OnStall | None = None) -> None:
        """Stream bytes as DATA frames."""
        for frame in data_frames(buffers):
            self.send(frame, on_stall)

    def send_failure(self, status: Status) -> None:
        """Give up and say why, where the channel still lets us and the link still works
        (a short bounded write: a peer that takes nothing does not hold us)."""
        buffers = self.conn.send_failure(status)
        if buffers:
            with contextlib.suppress(OSError):
                self.link.send(buffers, _give_up_after(1.0))

    def _fill(self, on_stall: OnStall | None) -> None:
        n = self.link.recv_into(memoryview(self._buf), on_stall)
        self.conn.receive_data(memoryview(self._buf)[:n])

    def next_event(self, on_stall: OnStall | None = None) -> Event | Closed:
        """The peer's next event, waiting for it (bounded by ``on_stall``).
        RemoteChannelError if the connection broke or the peer broke the protocol."""
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                assert not isinstance(ev, type(NEED_DATA))
                return ev
            self._fill(on_stall)

    def poll_event(self) -> Event | Closed | None:
        """An event the peer already sent, or None; never waits."""
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                assert not isinstance(ev, type(NEED_DATA))
                return ev
            if not self.link.readable():
                return None
            self._fill(None)

    def peer_failure(self, wait_s: float = 1.0) -> Status | None:
        """After a failed send: the ERROR or REJECT the peer sent before it closed, if
        it arrives within ``wait_s`` (see ``Connection.peer_failure``)."""
        end = time.monotonic() + wait_s
        while (status := self.conn.peer_failure()) is None:
            if self.conn.peer_closed or time.monotonic() > end:
                return None
            try:
                n = self.link.recv_into(memoryview(self._buf), _give_up_after(wait_s))
            except (OSError, RemoteChannelError):
                return None
            self.conn.receive_data(memoryview(self._buf)[:n])
        return status

    def receive_stream(self, decoder: StreamDecoder, on_record: Callable[[Record], None],
                       on_stall: OnStall) -> Event | Closed:
        """DATA into ``decoder`` (payloads read straight into its buffer: no copy),
        each record to ``on_record``, until an event that is not DATA (STREAM_END,
        ABORT), which it returns.  ``on_stall`` bounds every wait."""
        while True:
            direct = self.conn.direct_payload()
            if direct:
                view = decoder.writable()
                n = self.link.recv_into(view[: min(direct, view.nbytes)], on_stall)
                if n == 0:
                    self.conn.receive_data(b"")
                else:
                    decoder.wrote(n)
                    self.conn.direct_payload_done(n)
            else:
                ev = self.conn.next_event()
                if ev is NEED_DATA:
                    self._fill(on_stall)
                    continue
                if not isinstance(ev, Data):
                    assert not isinstance(ev, type(NEED_DATA))
                    return ev
                for part in ev.payload:
                    decoder.feed(part)
            for rec in decoder.events():
                on_record(rec)


def _give_up_after(seconds: float) -> OnStall:
    def on_stall(stalled: float) -> None:
        if stalled > seconds:
            raise TimeoutError(f"no progress for {stalled:.1f} s")

    return on_stall


# --- the listener's handshake gate -------------------------------------------------------

#: a connection must have sent its whole first frame within this many seconds of being
#: accepted
HANDSHAKE_DEADLINE_S = 10.0
#: connections waiting for their first frame at once; more are closed as they arrive
MAX_PENDING = 64
#: the largest first frame (HELLO) the gate reads
MAX_HELLO = 64 * 1024


@dataclass
class _Pending:
    conn: socket.socket
    addr: Any
    deadline: float
    channel: Connection = field(default_factory=lambda: Connection(Role.DESTINATION))
    received: int = 0
    #: the first frame's header, as it arrives
    head: bytearray = field(default_factory=bytearray)
    #: False while a TLS handshake is still under way
    secure: bool = True


#: what the gate hands over: the socket, the peer's address, its connection (HELLO or
#: ABORT received), and that first event
OnHello = Callable[[socket.socket, Any, Connection, Hello | Abort], None]
#: a refused connection: the socket, the address, why, and its channel (None before one
#: could be read) to send a REJECT on
OnRefuse = Callable[[socket.socket, Any, str, Connection | None], None]


def first_event(conn: Connection) -> Hello | Abort | str | None:
    """The first event of a destination connection from the bytes it holds: HELLO or
    ABORT (a source that refused at pre-flight, with its token), a refusal reason, or
    None (more bytes needed).  Bytes after the first frame are refused: the source must
    wait for WELCOME."""
    try:
        ev = conn.next_event()
    except RemoteChannelError as exc:
        return exc.reason
    if ev is NEED_DATA:
        return None
    if isinstance(ev, Hello | Abort):
        try:
            more = conn.next_event()
        except RemoteChannelError:
            more = Closed()
        return ev if more is NEED_DATA or isinstance(ev, Abort) else "data sent before the welcome"
    return f"a connection must start with HELLO, not {type(ev).__name__.upper()}"


def _oversized(p: _Pending, chunk: bytes) -> str | None:
    """A refusal if the first frame's header announces more than :data:`MAX_HELLO`."""
    if len(p.head) < HEADER.size:
        p.head += chunk[: HEADER.size - len(p.head)]
        if len(p.head) == HEADER.size:
            length = HEADER.unpack(bytes(p.head))[2]
            if length > MAX_HELLO:
                return f"first frame of {length} bytes is over the {MAX_HELLO} byte limit"
    return None


def serve_handshakes(
    listener: socket.socket,
    stopping: Callable[[], bool],
    on_hello: OnHello,
    on_refuse: OnRefuse,
    deadline_s: float = HANDSHAKE_DEADLINE_S,
    max_pending: int = MAX_PENDING,
    tls: ssl.SSLContext | None = None,
    tls_error: Callable[[BaseException, Any], str] | None = None,
) -> None:
    """Accept connections and read their first frame, each into a destination
    :class:`~vmferry.migration.channel.Connection`, all in this one thread: a connection
    that has not sent a whole first frame within ``deadline_s`` (however slowly it
    trickles bytes) or sends a bad one goes to ``on_refuse``; one with a HELLO (or an
    ABORT carrying its token) goes, in blocking mode, to ``on_hello``, which owns it from
    then on.  At most ``max_pending`` connections wait at once.  With ``tls`` (a server
    context) the TLS handshake runs here as well, non-blocking and within the same
    deadline; ``tls_error`` words its failures.  Returns when ``stopping()`` or the
    listener is closed."""
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    pending: dict[int, _Pending] = {}

    def drop(p: _Pending, reason: str | None) -> None:
        sel.unregister(p.conn)
        del pending[p.conn.fileno()]
        if reason is not None:
            on_refuse(p.conn, p.addr, reason, p.channel if p.secure else None)

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
                    want = MAX_HELLO + HEADER.size - p.received
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
                p.received += len(chunk)
                p.channel.receive_data(chunk)
                first = first_event(p.channel)
                if first is None:
                    first = _oversized(p, chunk)
                if isinstance(first, str):
                    drop(p, first)
                elif first is not None:
                    drop(p, None)
                    p.conn.setblocking(True)
                    on_hello(p.conn, p.addr, p.channel, first)
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
    on_refuse: OnRefuse,
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
        on_refuse(conn, addr, f"{max_pending} connections already wait for their hello", None)
        return True
    if tls is not None:
        try:
            conn = tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            on_refuse(conn, addr, f"TLS setup failed: {exc}", None)
            return True
    p = _Pending(conn, addr, time.monotonic() + deadline_s, secure=tls is None)
    pending[conn.fileno()] = p
    sel.register(conn, selectors.EVENT_READ, p)
    return True


def refusal(reason: str) -> Status:
    """The status a destination refuses a connection with at the handshake."""
    return Status(ErrorKind.REFUSED, "handshake", reason)
