"""The whole vmferry error tree.

Every error vmferry raises on purpose derives from :class:`VmferryError`.  The tree splits
blame the way h11 does: *local* errors mean our caller misused an API, *remote* errors mean
a peer (a guest, a stream, another host) sent something illegal, and *hazards* are bugs the
models detect in themselves (use after free, leaks, broken invariants) -- the events our
faulty modes exist to reproduce.

::

    VmferryError
     +-- ConfigError                 bad VM definition, profile, CLI argument
     +-- ModelError                  a hardware/firmware model refused an operation
     |    +-- KernelError            carries an errno exactly as the kernel returns it
     |    +-- GuestMemoryError       gpa out of range / misaligned guest memory access
     +-- HazardError                 a model detected a bug in itself (faulty modes)
     |    +-- UseAfterFree
     |    +-- DoubleFree
     |    +-- RefcountLeak
     |    +-- InvariantViolation
     |    +-- Deadlock
     |    +-- NonTermination
     +-- StreamError                 migration stream problems
     |    +-- StreamDecodeError      the bytes are not a valid stream (remote)
     |    |    +-- BadMagic, UnsupportedVersion, UnknownRecord, TruncatedRecord,
     |    |    +-- OversizedRecord, ChecksumMismatch, MalformedRecord
     |    +-- StreamUsageError       the codec was driven wrongly (local)
     +-- MigrationError              a migration session failed; names the step
     |    +-- MigrationRefused       pre-flight said no, before any downtime
     |    +-- MigrationCancelled
     |    +-- PeerError              the other side reported an error or went away
     |    +-- ChannelError           the inter-host control protocol was broken
     |         +-- LocalChannelError   we drove the channel wrongly (send in the wrong state)
     |         +-- RemoteChannelError  the peer sent an illegal frame or vanished mid-exchange
     |         +-- ChannelTimeout      the peer did not answer before the driver's deadline
     +-- HostError                   daemon, transport, store, control API
          +-- ApiError               an HTTP control request failed (status + message)

Subsystem packages may subclass these (``VfioError(KernelError)`` and so on) next to the
code that raises them; what a caller catches is always one of the classes above.
"""

from __future__ import annotations

import errno as _errno


class VmferryError(Exception):
    """Root of every error vmferry raises deliberately."""


class ConfigError(VmferryError):
    """A VM definition, profile or option is invalid."""


# --- models -----------------------------------------------------------------------------


class ModelError(VmferryError):
    """A model of the host stack refused an operation."""


class KernelError(ModelError):
    """An operation failed the way the kernel fails it: with an errno.

    ``errno`` is the positive errno value (``errno.EINVAL``); the kernel returns it negated.
    """

    def __init__(self, err: int, message: str = "") -> None:
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{name}: {message}" if message else name)

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))


class GuestMemoryError(ModelError):
    """A guest-physical access fell outside guest RAM or broke an alignment rule."""


# --- hazards ----------------------------------------------------------------------------


class HazardError(VmferryError):
    """A model detected a bug in itself: the events faulty modes reproduce.

    ``hazard`` is a short stable name used in reports and JSON (``"use-after-free"``).
    """

    hazard = "hazard"


class UseAfterFree(HazardError):
    hazard = "use-after-free"


class DoubleFree(HazardError):
    hazard = "double-free"


class RefcountLeak(HazardError):
    hazard = "refcount-leak"


class InvariantViolation(HazardError):
    hazard = "invariant-violation"


class Deadlock(HazardError):
    hazard = "deadlock"


class NonTermination(HazardError):
    hazard = "non-termination"


# --- migration stream -------------------------------------------------------------------


class StreamError(VmferryError):
    """Anything wrong with a migration stream."""


class StreamDecodeError(StreamError):
    """The bytes are not a valid vmferry stream.  ``offset`` is where decoding stopped."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{message}{where}")


class BadMagic(StreamDecodeError):
    pass


class UnsupportedVersion(StreamDecodeError):
    pass


class UnknownRecord(StreamDecodeError):
    pass


class TruncatedRecord(StreamDecodeError):
    pass


class OversizedRecord(StreamDecodeError):
    pass


class ChecksumMismatch(StreamDecodeError):
    pass


class MalformedRecord(StreamDecodeError):
    pass


class StreamUsageError(StreamError):
    """The codec was driven in a way its contract forbids (a local bug)."""


# --- migration --------------------------------------------------------------------------


class MigrationError(VmferryError):
    """A migration failed.  ``step`` names where (``"setup"``, ``"ram pass 3"``, ...);
    ``reason`` is what went wrong, without the step."""

    def __init__(self, message: str, step: str = "") -> None:
        self.step = step
        self.reason = message
        super().__init__(f"{step}: {message}" if step else message)


class MigrationRefused(MigrationError):
    """Pre-flight checks refused the migration before any downtime."""


class MigrationCancelled(MigrationError):
    """The operator cancelled the migration."""


class DeviceLoadError(MigrationError):
    """The destination could not load a device's state (its driver rejected it)."""


class PeerError(MigrationError):
    """The other side reported an error or the connection to it broke."""


class ChannelError(MigrationError):
    """The inter-host control protocol (:mod:`vmferry.migration.channel`) was broken.
    ``step`` names the channel state the connection was in."""


class LocalChannelError(ChannelError):
    """Our side drove the channel wrongly: a send the state does not allow (a bug here)."""


class RemoteChannelError(ChannelError, PeerError):
    """The peer sent an illegal or undecodable frame, or the connection ended
    mid-exchange.  ``data`` holds the offending bytes when there are any."""

    def __init__(self, message: str, step: str = "", data: bytes = b"") -> None:
        super().__init__(message, step)
        self.data = data


class ChannelTimeout(ChannelError):
    """The peer did not answer before the deadline the driver set for that state."""


# --- host -------------------------------------------------------------------------------


class HostError(VmferryError):
    """A host daemon, its store, transport or control API failed."""


#: The ``kind`` an API error carries when its raiser names none, by HTTP status.
API_ERROR_KINDS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "TooLarge",
    422: "Unprocessable",
    500: "InternalError",
    502: "PeerUnreachable",
    503: "Unavailable",
}


class ApiError(HostError):
    """A control API request failed; ``status`` is the HTTP status, ``kind`` a stable name
    a script can test (``"NotFound"``, ``"VmTooLarge"``, ...), ``step`` where it failed
    (empty when the request failed as a whole)."""

    def __init__(self, status: int, message: str, kind: str = "", step: str = "") -> None:
        self.status = status
        self.message = message
        self.kind = kind or API_ERROR_KINDS.get(status, "Error")
        self.step = step
        super().__init__(f"HTTP {status}: {message}")

    def to_json(self) -> dict[str, object]:
        """The body the control API answers with: ``{"error": {kind, message, step}}``."""
        return {"error": {"kind": self.kind, "message": self.message, "step": self.step}}
