"""A failure as it crosses the wire: the same typed error on both sides.

When one host gives up (a checksum mismatch while decoding, a refused configuration, an
operator's cancel), it sends a :class:`Status`: an :class:`ErrorKind`, the step that
failed, the message and, for kernel and HTTP errors, the numeric code.  The peer turns it
back into the error class from :mod:`vmferry.errors` with :meth:`Status.exception`, so a
``ChecksumMismatch`` on the destination is a ``ChecksumMismatch`` on the source too.

Kinds are explicit u16 values (never positions); 0 is reserved as invalid.  A class this
table does not know travels as its nearest known ancestor (``VfioError`` as
``KernelError``); a non-vmferry exception travels as ``INTERNAL`` and comes back as a
:class:`~vmferry.errors.MigrationError` whose message says so.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from vmferry import errors as E


class ErrorKind(enum.IntEnum):
    INVALID = 0
    MIGRATION = 1
    REFUSED = 2
    CANCELLED = 3
    PEER = 4
    CHANNEL = 5
    LOCAL_CHANNEL = 6
    REMOTE_CHANNEL = 7
    CHANNEL_TIMEOUT = 8
    CONFIG = 9
    MODEL = 10
    KERNEL = 11
    GUEST_MEMORY = 12
    STREAM = 13
    STREAM_DECODE = 14
    BAD_MAGIC = 15
    UNSUPPORTED_VERSION = 16
    UNKNOWN_RECORD = 17
    TRUNCATED_RECORD = 18
    OVERSIZED_RECORD = 19
    CHECKSUM_MISMATCH = 20
    MALFORMED_RECORD = 21
    STREAM_USAGE = 22
    HOST = 23
    API = 24
    HAZARD = 25
    INTERNAL = 26
    #: channel 1.2 (a peer of 1.1 is sent MIGRATION instead: see ``for_peer``)
    DEVICE_LOAD = 27


#: kind <-> class, one row each; the decoder's direction and the encoder's come from here
CLASSES: dict[ErrorKind, type[E.VmferryError]] = {
    ErrorKind.MIGRATION: E.MigrationError,
    ErrorKind.REFUSED: E.MigrationRefused,
    ErrorKind.CANCELLED: E.MigrationCancelled,
    ErrorKind.PEER: E.PeerError,
    ErrorKind.CHANNEL: E.ChannelError,
    ErrorKind.LOCAL_CHANNEL: E.LocalChannelError,
    ErrorKind.REMOTE_CHANNEL: E.RemoteChannelError,
    ErrorKind.CHANNEL_TIMEOUT: E.ChannelTimeout,
    ErrorKind.CONFIG: E.ConfigError,
    ErrorKind.MODEL: E.ModelError,
    ErrorKind.KERNEL: E.KernelError,
    ErrorKind.GUEST_MEMORY: E.GuestMemoryError,
    ErrorKind.STREAM: E.StreamError,
    ErrorKind.STREAM_DECODE: E.StreamDecodeError,
    ErrorKind.BAD_MAGIC: E.BadMagic,
    ErrorKind.UNSUPPORTED_VERSION: E.UnsupportedVersion,
    ErrorKind.UNKNOWN_RECORD: E.UnknownRecord,
    ErrorKind.TRUNCATED_RECORD: E.TruncatedRecord,
    ErrorKind.OVERSIZED_RECORD: E.OversizedRecord,
    ErrorKind.CHECKSUM_MISMATCH: E.ChecksumMismatch,
    ErrorKind.MALFORMED_RECORD: E.MalformedRecord,
    ErrorKind.STREAM_USAGE: E.StreamUsageError,
    ErrorKind.HOST: E.HostError,
    ErrorKind.API: E.ApiError,
    ErrorKind.HAZARD: E.HazardError,
    ErrorKind.DEVICE_LOAD: E.DeviceLoadError,
}
#: the first channel minor version that knows each kind added after 1.0
KIND_SINCE: dict[ErrorKind, int] = {ErrorKind.DEVICE_LOAD: 2}
_KINDS: dict[type[E.VmferryError], ErrorKind] = {cls: kind for kind, cls in CLASSES.items()}
MAX_MESSAGE = 4096


@dataclass(frozen=True)
class Status:
    """Why one side gave up.  Validates itself: a kind other than INVALID, a bounded
    message, a step naming where it failed."""

    kind: ErrorKind
    step: str
    message: str
    #: the errno of a KernelError, the HTTP status of an ApiError, otherwise 0
    code: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ErrorKind) or self.kind is ErrorKind.INVALID:
            raise E.LocalChannelError(f"a status needs an error kind, not {self.kind!r}")
        if len(self.message) > MAX_MESSAGE:
            object.__setattr__(self, "message", self.message[: MAX_MESSAGE - 3] + "...")

    @classmethod
    def from_exception(cls, exc: BaseException, step: str = "") -> Status:
        """The status that makes ``exc`` arrive on the other side as the same class."""
        kind = next((_KINDS[c] for c in type(exc).__mro__ if c in _KINDS), None)
        if kind is None:
            return cls(ErrorKind.INTERNAL, step, f"internal error: {type(exc).__name__}: {exc}")
        if isinstance(exc, E.MigrationError):
            return cls(kind, step or exc.step, exc.reason)
        if isinstance(exc, E.KernelError):
            prefix = f"{exc.errno_name}: "
            text = str(exc)
            return cls(kind, step, text.removeprefix(prefix) if text != exc.errno_name else "",
                       exc.errno)  # fmt: skip
        if isinstance(exc, E.ApiError):
            return cls(kind, step, exc.message, exc.status)
        return cls(kind, step, str(exc))

    def for_peer(self, minor: int) -> Status:
        """This status as a peer speaking channel 1.``minor`` can read: a kind it does
        not know travels as MIGRATION (its message names the class)."""
        if KIND_SINCE.get(self.kind, 0) <= minor:
            return self
        return Status(ErrorKind.MIGRATION, self.step,
                      f"{CLASSES[self.kind].__name__}: {self.message}", self.code)  # fmt: skip

    def exception(self) -> E.VmferryError:
        """The error as the peer raised it (its class; the step and message it named)."""
        cls = CLASSES.get(self.kind, E.MigrationError)
        if issubclass(cls, E.MigrationError):
            return cls(self.message, self.step)
        if cls is E.KernelError:
            return E.KernelError(self.code, self.message)
        if cls is E.ApiError:
            return E.ApiError(self.code, self.message)
        return cls(self.message)

    def describe(self) -> str:
        """One line for an operator: ``ChecksumMismatch at receiving stream: ...``."""
        name = CLASSES.get(self.kind, E.MigrationError).__name__
        where = f" at {self.step}" if self.step else ""
        return f"{name}{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": int(self.kind), "step": self.step, "message": self.message,
                "code": self.code}  # fmt: skip

    @classmethod
    def from_json(cls, raw: object) -> Status:
        """Raises RemoteChannelError for anything that is not a well-formed status."""
        if not isinstance(raw, dict):
            raise E.RemoteChannelError(f"status is not an object: {raw!r}")
        kind, step, message, code = (raw.get(k) for k in ("kind", "step", "message", "code"))
        if not isinstance(kind, int) or kind not in ErrorKind.__members__.values() or not kind:
            raise E.RemoteChannelError(f"status has an unknown error kind {kind!r}")
        if not isinstance(step, str) or not isinstance(message, str):
            raise E.RemoteChannelError("status needs a string step and message")
        if not isinstance(code, int) or isinstance(code, bool):
            raise E.RemoteChannelError(f"status code {code!r} is not an integer")
        return cls(ErrorKind(kind), step, message, code)
