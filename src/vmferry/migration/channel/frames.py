"""Channel frames: a fixed header, then a typed body.

::

     0        2        4                 8                 12
     +--------+--------+-----------------+-----------------+------------------------+
     | command| flags  | length (u32 BE) | crc32 of payload| payload (length bytes)  |
     | u16 BE | u16 =0 |                 | (0 for DATA)    |                        |
     +--------+--------+-----------------+-----------------+------------------------+

``command`` is a :class:`Command` (0 is reserved as invalid; unknown values are typed
decode errors).  Control frames carry a UTF-8 JSON object whose keys and types each
command declares once in :data:`BODIES`, and a CRC-32 of that payload: a damaged COMMIT
is refused, never half-understood.  DATA frames carry raw migration-stream bytes, which
check themselves (every stream record ends with a running checksum), so their CRC field
is zero and unchecked.

HELLO is the first frame of a connection and carries the protocol version before its
JSON: ``b"VMFC" | major u16 | minor u16``.  WELCOME answers with the version the
destination speaks.  A peer accepts the same major version and any minor version.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import LocalChannelError, RemoteChannelError
from vmferry.migration.channel.status import Status
from vmferry.migration.stream.records import Buffer

MAJOR = 1
#: 2: SWITCHOVER_ACK (a destination speaking it approves the stop once every device's
#: pre-copy initial data is loaded; a peer below 2 neither sends nor expects it)
#: 3: PAGES records of live guest memory on the data channels, and the destination's
#: OWED reports of the ones that arrived torn (see :mod:`vmferry.migration.multichannel`)
MINOR = 3
#: the first minor version that has SWITCHOVER_ACK
SWITCHOVER_ACK_MINOR = 2
#: the first minor version whose data channels carry LIVE records and OWED reports
LIVE_PAGES_MINOR = 3
MAGIC = b"VMFC"
HEADER = struct.Struct(">HHII")
VERSION = struct.Struct(">4sHH")
#: control frames are small; a larger length is an error before anything is buffered
MAX_CONTROL = 1 << 20
#: one DATA frame carries at most one batch of the stream
MAX_DATA = 64 << 20


class Command(enum.IntEnum):
    INVALID = 0
    HELLO = 1  # source -> destination: version, token, stream version, runstate
    WELCOME = 2  # destination -> source: the token was good, send the stream
    REJECT = 3  # destination -> source: refused at the handshake (status)
    DATA = 4  # source -> destination: migration-stream bytes
    STREAM_END = 5  # source -> destination: the stream is complete
    LOADED = 6  # destination -> source: state loaded, digests and counts (nothing runs)
    COMMIT = 7  # source -> destination: the point of no return
    RESUMED = 8  # destination -> source: the guest runs there now (post-load report)
    ABORT = 9  # source -> destination: give up, discard (status)
    ERROR = 10  # destination -> source: failed, discarded, will not resume (status)
    RESOLVE = 11  # source -> destination, new connection: "I committed; did you?"
    SWITCHOVER_ACK = 12  # destination -> source, while streaming: devices' initial data loaded


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    token: str
    stream_version: tuple[int, int]
    runstate: str
    source: str
    major: int = MAJOR
    minor: int = MINOR


@dataclass(frozen=True)
class Welcome:
    host: str
    major: int = MAJOR
    minor: int = MINOR


@dataclass(frozen=True)
class Reject:
    status: Status


@dataclass(frozen=True)
class Data:
    """Stream bytes.  Sent as one frame; received as one or more chunks of it."""

    payload: Sequence[Buffer]

    def __post_init__(self) -> None:
        if self.nbytes > MAX_DATA:
            raise LocalChannelError(f"a DATA frame of {self.nbytes} bytes is over the "
                                    f"{MAX_DATA} limit")  # fmt: skip

    @property
    def nbytes(self) -> int:
        return sum(memoryview(b).nbytes for b in self.payload)


@dataclass(frozen=True)
class StreamEnd:
    pass


@dataclass(frozen=True)
class Loaded:
    """The destination's acknowledgement: ``load_ms``, ``digests`` (when verification was
    asked for), ``verification_ms``, page counts."""

    ack: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SwitchoverAck:
    """The destination loaded every device's pre-copy initial data: the source may stop
    the guest.  ``ack``: ``device_bytes`` loaded before it and ``load_ms`` they took."""

    ack: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Commit:
    pass


@dataclass(frozen=True)
class Resumed:
    """``resume_ms`` and ``post_load``: each handler's post-load report."""

    report: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Abort:
    status: Status
    #: set when the ABORT is a connection's first frame (pre-flight refused: the
    #: destination forgets the token it handed out)
    token: str = ""


@dataclass(frozen=True)
class Error:
    status: Status


@dataclass(frozen=True)
class Resolve:
    token: str


@dataclass(frozen=True)
class Closed:
    """The peer closed the connection after the exchange had ended."""


Event = Hello | Welcome | Reject | Data | StreamEnd | Loaded | Commit | Resumed | Abort | Error \
    | Resolve | SwitchoverAck  # fmt: skip

COMMAND_OF: dict[type[Any], Command] = {
    Hello: Command.HELLO, Welcome: Command.WELCOME, Reject: Command.REJECT,
    Data: Command.DATA, StreamEnd: Command.STREAM_END, Loaded: Command.LOADED,
    Commit: Command.COMMIT, Resumed: Command.RESUMED, Abort: Command.ABORT,
    Error: Command.ERROR, Resolve: Command.RESOLVE, SwitchoverAck: Command.SWITCHOVER_ACK,
}  # fmt: skip

# --- bodies ------------------------------------------------------------------------------

#: each control command's JSON keys and their types, declared once
BODIES: dict[Command, dict[str, type]] = {
    Command.HELLO: {"token": str, "stream_version": list, "runstate": str, "source": str},
    Command.WELCOME: {"host": str},
    Command.REJECT: {"status": dict},
    Command.STREAM_END: {},
    Command.LOADED: {"ack": dict},
    Command.COMMIT: {},
    Command.RESUMED: {"report": dict},
    Command.ABORT: {"status": dict, "token": str},
    Command.ERROR: {"status": dict},
    Command.RESOLVE: {"token": str},
    Command.SWITCHOVER_ACK: {"ack": dict},
}


def encode(event: Event) -> list[Buffer]:
    """The frame for ``event``: a header and its payload buffers (DATA: not copied)."""
    cmd = COMMAND_OF[type(event)]
    if isinstance(event, Data):
        return [HEADER.pack(cmd, 0, event.nbytes, 0), *event.payload]
    body = json.dumps(_body_of(event), separators=(",", ":")).encode()
    if isinstance(event, Hello | Welcome):
        body = VERSION.pack(MAGIC, event.major, event.minor) + body
    return [HEADER.pack(cmd, 0, len(body), zlib.crc32(body)), body]


def _body_of(event: Event) -> dict[str, Any]:
    if isinstance(event, Hello):
        return {"token": event.token, "stream_version": list(event.stream_version),
                "runstate": event.runstate, "source": event.source}  # fmt: skip
    if isinstance(event, Welcome):
        return {"host": event.host}
    if isinstance(event, Reject | Error):
        return {"status": event.status.to_json()}
    if isinstance(event, Abort):
        return {"status": event.status.to_json(), "token": event.token}
    if isinstance(event, Loaded | SwitchoverAck):
        return {"ack": dict(event.ack)}
    if isinstance(event, Resumed):
        return {"report": dict(event.report)}
    if isinstance(event, Resolve):
        return {"token": event.token}
    return {}


@dataclass(frozen=True)
class Header:
    command: Command
    length: int
    crc: int


def decode_header(raw: bytes) -> Header:
    """Validate a frame header; RemoteChannelError names what is wrong with it."""
    cmd, flags, length, crc = HEADER.unpack(raw)
    if raw[:1] in (b"\x15", b"\x16") and raw[1:2] == b"\x03":
        raise RemoteChannelError("the peer speaks TLS and this side does not (plaintext "
                                 "connection to a TLS host?)", data=raw)  # fmt: skip
    if raw[:2] == b"\0\0" and raw[4:5] == b"{":
        raise RemoteChannelError("the peer speaks the earlier JSON control frames (a vmferry "
                                 "host from before channel protocol 1); this host speaks "
                                 f"channel protocol {MAJOR}.{MINOR}", data=raw)  # fmt: skip
    if cmd not in Command.__members__.values() or cmd == Command.INVALID:
        raise RemoteChannelError(f"unknown channel command {cmd:#06x}", data=raw)
    if flags:
        raise RemoteChannelError(f"{Command(cmd).name} frame with reserved flags {flags:#x}",
                                 data=raw)  # fmt: skip
    limit = MAX_DATA if cmd == Command.DATA else MAX_CONTROL
    if length > limit:
        raise RemoteChannelError(f"{Command(cmd).name} frame of {length} bytes is over the "
                                 f"{limit} limit", data=raw)  # fmt: skip
    return Header(Command(cmd), length, crc)


def decode_body(header: Header, payload: bytes) -> Event:
    """The event a complete control frame carries; RemoteChannelError if it is damaged,
    of another protocol version or missing a field."""
    name = header.command.name
    if zlib.crc32(payload) != header.crc:
        raise RemoteChannelError(f"damaged {name} frame (CRC mismatch)", data=payload[:64])
    major = minor = 0
    if header.command in (Command.HELLO, Command.WELCOME):
        if len(payload) < VERSION.size:
            raise RemoteChannelError(f"{name} frame too short for a version", data=payload)
        magic, major, minor = VERSION.unpack_from(payload)
        if magic != MAGIC:
            raise RemoteChannelError(f"{name} frame with magic {magic!r}, not {MAGIC!r}")
        if major != MAJOR:
            raise RemoteChannelError(f"channel protocol {major}.{minor} is not supported "
                                     f"(this host speaks {MAJOR}.{MINOR})")  # fmt: skip
        payload = payload[VERSION.size :]
    body = _json(name, payload)
    _check_fields(header.command, body)
    return _event(header.command, body, major, minor)


def _json(name: str, payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteChannelError(f"{name} body is not JSON: {exc}", data=payload[:64]) from exc
    if not isinstance(body, dict):
        raise RemoteChannelError(f"{name} body is not an object", data=payload[:64])
    return body


def _check_fields(cmd: Command, body: dict[str, Any]) -> None:
    want = BODIES[cmd]
    if set(body) != set(want):
        raise RemoteChannelError(
            f"{cmd.name} body has keys {sorted(body)}, expected {sorted(want)}"
        )
    for key, typ in want.items():
        value = body[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise RemoteChannelError(f"{cmd.name}.{key} is {type(value).__name__}, "
                                     f"expected {typ.__name__}")  # fmt: skip


def _event(cmd: Command, body: dict[str, Any], major: int, minor: int) -> Event:
    if cmd is Command.HELLO:
        sv = body["stream_version"]
        if len(sv) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in sv):
            raise RemoteChannelError(f"HELLO.stream_version {sv!r} is not [major, minor]")
        return Hello(body["token"], (sv[0], sv[1]), body["runstate"], body["source"],
                     major, minor)  # fmt: skip
    if cmd is Command.WELCOME:
        return Welcome(body["host"], major, minor)
    if cmd is Command.REJECT:
        return Reject(Status.from_json(body["status"]))
    if cmd is Command.ERROR:
        return Error(Status.from_json(body["status"]))
    if cmd is Command.ABORT:
        return Abort(Status.from_json(body["status"]), body["token"])
    if cmd is Command.LOADED:
        return Loaded(body["ack"])
    if cmd is Command.SWITCHOVER_ACK:
        return SwitchoverAck(body["ack"])
    if cmd is Command.RESUMED:
        return Resumed(body["report"])
    if cmd is Command.RESOLVE:
        return Resolve(body["token"])
    if cmd is Command.COMMIT:
        return Commit()
    return StreamEnd()
