"""One end of a migration channel, sans-IO.

Theory of operation
-------------------
:class:`Connection` owns no socket, thread or clock.  The driver feeds it the bytes it
read (:meth:`Connection.receive_data`, ``b""`` at end of file), takes events out
(:meth:`Connection.next_event`, :data:`NEED_DATA` when more bytes are needed) and turns
its own events into bytes (:meth:`Connection.send`).  Every event moves the connection
through :data:`~vmferry.migration.channel.table.TRANSITIONS`; a move the table lacks is
a :class:`~vmferry.errors.LocalChannelError` when we send it and a
:class:`~vmferry.errors.RemoteChannelError` when the peer does.  Any exception moves the
connection to ERROR and remembers where it happened (:attr:`Connection.failed_in`);
afterwards it refuses every call except :meth:`Connection.send_failure`.

DATA payloads may be megabytes.  The driver may read them straight into its own sink:
while :meth:`Connection.direct_payload` is positive, up to that many bytes of the current
DATA frame are due and nothing is buffered, so the driver may ``recv_into`` its decoder
and report the count with :meth:`Connection.direct_payload_done`.  Otherwise the payload
arrives as :class:`~vmferry.migration.channel.frames.Data` chunks.

Once this side reached DONE or ABORTED, frames the peer had already sent (DATA behind our
ERROR, a LOADED crossing our ABORT) are decoded and dropped.  End of file then gives
:class:`~vmferry.migration.channel.frames.Closed`; end of file before that is a
RemoteChannelError ("the peer closed the connection in state deciding").
"""

from __future__ import annotations

import enum

from vmferry.errors import LocalChannelError, RemoteChannelError
from vmferry.migration.channel.frames import (
    COMMAND_OF,
    HEADER,
    Abort,
    Closed,
    Command,
    Data,
    Error,
    Event,
    Header,
    Reject,
    decode_body,
    decode_header,
    encode,
)
from vmferry.migration.channel.status import Status
from vmferry.migration.channel.table import TERMINAL, TRANSITIONS, Dir, Role, State
from vmferry.migration.stream.records import Buffer


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA
_COMPACT_AT = 1 << 16
#: a destination in these states refuses with REJECT (it never said WELCOME)
_BEFORE_WELCOME = frozenset({State.IDLE, State.HANDSHAKE})


class Connection:
    """One end of the channel (see the module docstring)."""

    def __init__(self, role: Role) -> None:
        self.role = role
        #: invariant: a key of TRANSITIONS[role]; ERROR once any call raised
        self.state = State.IDLE
        #: the state the connection was in when it moved to ERROR
        self.failed_in: State | None = None
        #: whether this side sent COMMIT (source) or received it (destination)
        self.committed = False
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        #: invariant: > 0 only inside a DATA frame, before its last payload byte
        self._payload_left = 0
        self._header: Header | None = None
        self._last_sent: Command | None = None

    # --- bytes in --------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Bytes the peer sent; ``b""`` means it closed the connection."""
        if self._eof:
            raise LocalChannelError("receive_data() after end of file", self.state.value)
        if not len(data):
            self._eof = True
            return
        if self._pos >= _COMPACT_AT:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def direct_payload(self) -> int:
        """How many DATA payload bytes the driver may read straight into its sink now
        (0: use :meth:`next_event`)."""
        if self.state in TERMINAL:
            return 0
        if self._payload_left and self._pos == len(self._buf) and not self._eof:
            return self._payload_left
        return 0

    def direct_payload_done(self, n: int) -> None:
        """The driver delivered ``n`` payload bytes itself."""
        if not 0 < n <= self.direct_payload():
            self._fail(LocalChannelError(f"direct_payload_done({n}) with {self.direct_payload()}"
                                         " bytes allowed", self.state.value))  # fmt: skip
        self._payload_left -= n

    # --- events out ------------------------------------------------------------------

    def next_event(self) -> Event | Closed | _NeedData:
        """The next event from the peer, NEED_DATA, or Closed after a finished exchange.

        Raises RemoteChannelError for an illegal, damaged or truncated frame (the
        connection is then in ERROR), LocalChannelError if it already was."""
        if self.state is State.ERROR:
            raise LocalChannelError("next_event() on a connection in ERROR",
                                    (self.failed_in or self.state).value)  # fmt: skip
        try:
            while True:
                ev = self._next()
                if ev is None:
                    continue  # a frame dropped after the end of the exchange
                return ev
        except RemoteChannelError as exc:
            if not exc.step:  # a frame that did not decode: name the state it arrived in
                exc = RemoteChannelError(exc.reason, self.state.value, exc.data)
            self._fail(exc)
            raise

    def _next(self) -> Event | Closed | _NeedData | None:
        if self._payload_left:
            return self._payload_chunk()
        have = len(self._buf) - self._pos
        if self._header is None:
            if have < HEADER.size:
                return self._short(have)
            self._header = decode_header(bytes(self._buf[self._pos : self._pos + HEADER.size]))
            self._pos += HEADER.size
            if self._header.command is Command.DATA:
                return self._data_header(self._header)
            have -= HEADER.size
        header = self._header
        if have < header.length:
            return self._short(have + HEADER.size)
        payload = bytes(self._buf[self._pos : self._pos + header.length])
        self._pos += header.length
        self._header = None
        ev = decode_body(header, payload)
        return self._received(header.command, ev)

    def _data_header(self, header: Header) -> Event | None:
        self._header = None
        self._payload_left = header.length
        if self.state not in (State.DONE, State.ABORTED):
            self._move(Dir.RECV, Command.DATA)
        return None

    def _payload_chunk(self) -> Event | _NeedData | None:
        have = len(self._buf) - self._pos
        if not have:
            if self._eof:
                raise RemoteChannelError(f"connection closed inside a DATA frame "
                                         f"({self._payload_left} bytes missing)",
                                         self.state.value)  # fmt: skip
            return NEED_DATA
        n = min(have, self._payload_left)
        chunk = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self._payload_left -= n
        return None if self.state in (State.DONE, State.ABORTED) else Data((chunk,))

    def _short(self, have: int) -> Closed | _NeedData:
        if not self._eof:
            return NEED_DATA
        if have:
            raise RemoteChannelError(f"connection closed inside a frame ({have} bytes of it)",
                                     self.state.value)  # fmt: skip
        if self.state in TERMINAL:
            return Closed()
        raise RemoteChannelError(f"the peer closed the connection in state {self.state.value}",
                                 self.state.value)  # fmt: skip

    def _received(self, cmd: Command, ev: Event) -> Event | None:
        if self.state in (State.DONE, State.ABORTED):
            return None
        self._move(Dir.RECV, cmd)
        return ev

    # --- events in -------------------------------------------------------------------

    def send(self, event: Event) -> list[Buffer]:
        """The bytes that carry ``event``; LocalChannelError if the state forbids it."""
        if self.state is State.ERROR:
            raise LocalChannelError(f"send({type(event).__name__}) on a connection in ERROR",
                                    (self.failed_in or self.state).value)  # fmt: skip
        cmd = COMMAND_OF[type(event)]
        self._move(Dir.SEND, cmd)
        self._last_sent = cmd
        return encode(event)

    def send_failed(self) -> None:
        """The bytes of the last :meth:`send` did not all leave (the write raised).  The
        connection moves to ERROR; if that frame was COMMIT, the commit did not happen:
        a frame cut short is no frame, so the peer cannot have acted on it."""
        if self._last_sent is Command.COMMIT and self.role is Role.SOURCE:
            self.committed = False
        if self.state is not State.ERROR:
            self.failed_in, self.state = self.state, State.ERROR

    def send_failure(self, status: Status) -> list[Buffer]:
        """Give up, and say why where that still means something: ABORT from a source,
        ERROR from a destination.

        A destination that has not sent WELCOME yet (a bad HELLO, a wrong version, an
        unknown token) refuses with REJECT instead of ERROR.  Where the table has the
        move, it is taken.  Otherwise the connection moves to
        (or stays in) ERROR, and: a destination that did not receive COMMIT still sends
        its ERROR frame -- after a damaged frame, say -- because it is a promise the
        source may act on ("discarded, will never resume"); a source past COMMIT, or a
        destination past COMMIT, sends nothing: there is nothing left to take back.
        """
        if self.state in (State.DONE, State.ABORTED):
            return []  # the exchange is over; nothing changes
        ev: Event = Abort(status) if self.role is Role.SOURCE else Error(status)
        if self.role is Role.DESTINATION and (self.failed_in or self.state) in _BEFORE_WELCOME:
            ev = Reject(status)  # refused at the handshake: REJECT, which a source expects
        target = TRANSITIONS[self.role][self.state].get((Dir.SEND, COMMAND_OF[type(ev)]))
        if target is not None:
            self.state = target
            return encode(ev)
        if self.state is not State.ERROR:
            self.failed_in, self.state = self.state, State.ERROR
        if self.role is Role.DESTINATION and not self.committed:
            return encode(ev)
        return []

    def peer_failure(self) -> Status | None:
        """The status of an ERROR or REJECT the peer sent, if its bytes are here, read
        after this side failed (a write that raised because the peer closed, say): the
        frames received so far are decoded but not judged by the table, and the state
        does not change.  None if no such frame (or only part of one) arrived."""
        while True:
            have = len(self._buf) - self._pos
            if self._payload_left:
                skip = min(have, self._payload_left)
                self._pos += skip
                self._payload_left -= skip
                if self._payload_left:
                    return None
                continue
            if self._header is None:
                if have < HEADER.size:
                    return None
                try:
                    header = decode_header(bytes(self._buf[self._pos : self._pos + HEADER.size]))
                except RemoteChannelError:
                    return None
                self._pos += HEADER.size
                if header.command is Command.DATA:
                    self._payload_left = header.length
                    continue
                self._header = header
                have -= HEADER.size
            header = self._header
            if have < header.length:
                return None
            payload = bytes(self._buf[self._pos : self._pos + header.length])
            self._pos += header.length
            self._header = None
            try:
                ev = decode_body(header, payload)
            except RemoteChannelError:
                return None
            if isinstance(ev, Error | Reject):
                return ev.status

    # --- the table -------------------------------------------------------------------

    def _move(self, direction: Dir, cmd: Command) -> None:
        target = TRANSITIONS[self.role][self.state].get((direction, cmd))
        if target is None:
            verb = "send" if direction is Dir.SEND else "receive"
            who = "we" if direction is Dir.SEND else "the peer"
            message = (f"a {self.role.value} in state {self.state.value} cannot {verb} "
                       f"{cmd.name} ({who} broke the protocol)")  # fmt: skip
            cls = LocalChannelError if direction is Dir.SEND else RemoteChannelError
            self._fail(cls(message, self.state.value))
        if cmd is Command.COMMIT:
            self.committed = True
        assert target is not None
        self.state = target

    def _fail(self, exc: Exception) -> None:
        if self.state is not State.ERROR:
            self.failed_in, self.state = self.state, State.ERROR
        raise exc

    @property
    def peer_closed(self) -> bool:
        """The peer closed its side (``receive_data(b"")`` was called)."""
        return self._eof

    @property
    def in_doubt(self) -> bool:
        """COMMIT went out (source) or came in (destination), and the connection broke
        before RESUMED or ERROR settled what happened."""
        return self.committed and self.state is State.ERROR
