"""Data-transfer session files (the ``data_fd`` of migration v2) and a process fd table.

Theory of operation
-------------------
A :class:`DataStream` is the open file behind one session's ``data_fd``: a *saving*
stream (read-only; PRE_COPY or STOP_COPY data) or a *resuming* stream (write-only).  It is
a stream file: ``pread``/``pwrite`` fail with ESPIPE.

References: the file is born with one reference, the one handed to user space (installed
in an :class:`FdTable`, or returned by the Pythonic ``set_state``).  The driver that
opened the session takes a second one (``get``) and keeps it until the session ends,
the device is reset or closed, so closing the user's fd never loses the session.  When a
session ends the driver *disables* the file under its lock: buffers are freed, reads reach
ENODEV (or EOF for pds-like files), writes fail, and the file drops its owner pointer, so a
stale fd can never reach the device again.

Saving data is a queue of chunks appended by the driver; ``phase`` says whether running
dry is temporary (``precopy``: ENOMSG) or permanent (``final``: read returns 0).  Lock
order is the driver's: ``state_mutex`` before ``lock``.  Reads take only ``lock``.
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

from vmferry.errors import DoubleFree, UseAfterFree
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.states import PRECOPY_INFO, VFIO_MIG_GET_PRECOPY_INFO
from vmferry.sync import ModelLock, yield_point


class StreamKind(Enum):
    SAVING = "saving"
    RESUMING = "resuming"


#: user memory: anything exporting a byte buffer (read-only buffers fault on copy-out)
Buffer = bytes | bytearray | memoryview
Phase = Literal["precopy", "final"]
DisabledRead = Literal["enodev", "pds"]


@dataclass(frozen=True)
class PrecopyInfo:
    """``struct vfio_precopy_info`` output."""

    initial_bytes: int
    dirty_bytes: int
    flags: int = 0


class StreamOwner(Protocol):
    """What a live stream calls back into (the device core)."""

    def stream_write(self, stream: DataStream, data: memoryview) -> int: ...

    def stream_precopy_info(self, stream: DataStream, user_flags: int) -> PrecopyInfo: ...


def copy_in(arg: Buffer, offset: int, n: int) -> bytes:
    """Read ``n`` bytes of user memory ``arg`` at ``offset``; EFAULT beyond its end."""
    view = memoryview(arg).cast("B")
    if offset < 0 or offset + n > len(view):
        raise VfioError(errno.EFAULT, f"copy_from_user of {n} bytes at {offset} faults")
    return bytes(view[offset : offset + n])


def copy_out(arg: Buffer, offset: int, data: bytes) -> None:
    """Write ``data`` into user memory ``arg``; EFAULT if read-only or too short."""
    view = memoryview(arg).cast("B")
    if view.readonly or offset + len(data) > len(view):
        raise VfioError(errno.EFAULT, f"copy_to_user of {len(data)} bytes at {offset} faults")
    view[offset : offset + len(data)] = data


class DataStream:
    """The open file of one data-transfer session."""

    def __init__(
        self, kind: StreamKind, owner: StreamOwner, name: str,
        *, disabled_read: DisabledRead = "enodev",
    ) -> None:  # fmt: skip
        self.kind = kind
        #: ``name`` is unique per device (the driver numbers its sessions), never a
        #: process-wide serial: labels built from it must be the same in every run
        self.name = name
        self.lock = ModelLock(f"{self.name}.lock")
        self.disabled_read: DisabledRead = disabled_read
        #: invariant: >= 0; 0 means released (no fd, no driver reference)
        self.refcount = 1
        #: invariant: True once the session ended; then ``owner`` is None and no buffers
        self.disabled = False
        #: the file hit a stream error (mlx5: parser error); later writes get ENODEV
        self.errored = False
        self.user_closed = False
        #: invariant: None iff disabled (a sanitised file holds no device pointer)
        self.owner: StreamOwner | None = owner
        self.pos = 0  # bytes read (saving) or written (resuming)
        # saving side
        self.phase: Phase = "precopy"
        self.appended = 0  # bytes ever queued (max_pos)
        self.initial_total = 0  # pre-copy initial bytes (absolute position)
        self.reinit_pending = False
        self._chunks: deque[memoryview] = deque()
        # driver scratch for a resuming parser
        self.parser: object | None = None

    # --- references -------------------------------------------------------------------

    @property
    def released(self) -> bool:
        return self.refcount == 0

    def get(self) -> None:
        if self.refcount <= 0:
            raise UseAfterFree(f"get on released stream {self.name}")
        self.refcount += 1

    def put(self) -> None:
        if self.refcount <= 0:
            raise DoubleFree(f"put on released stream {self.name}")
        self.refcount -= 1
        if self.refcount == 0:
            self._chunks.clear()
            self.parser = None

    def close(self) -> None:
        """User space closes its reference (the fd, or the object set_state returned)."""
        if self.user_closed:
            raise VfioError(errno.EBADF, f"{self.name} already closed")
        self.user_closed = True
        self.put()

    # --- driver side --------------------------------------------------------------------

    def append(self, data: bytes | memoryview) -> None:
        """Queue saving data (the driver holds ``lock`` or owns the stream exclusively)."""
        if self.disabled:
            raise UseAfterFree(f"driver appends to disabled stream {self.name}")
        view = memoryview(data).cast("B")
        if len(view):
            self._chunks.append(view)
            self.appended += len(view)

    def corrupt_tail(self) -> None:
        """Fault injection: flip a byte in the middle of the newest queued chunk."""
        if self._chunks:
            tail = bytearray(self._chunks.pop())
            tail[len(tail) // 2] ^= 0xFF
            self._chunks.append(memoryview(tail))

    @property
    def buffered(self) -> int:
        return self.appended - self.pos

    def disable(self) -> None:
        """End the session for this file: free buffers, force EOF/ENODEV, drop owner."""
        with self.lock:
            yield_point("stream disable", self, write=True)
            self.disabled = True
            self.owner = None
            self._chunks.clear()
            self.parser = None
            if self.disabled_read == "pds":
                self.appended = self.initial_total = 0

    # --- user side ------------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes; b"" at permanent end of stream."""
        buf = bytearray(max(n, 0))
        got = self.readinto(buf)
        return bytes(buf[:got]) if got != len(buf) else bytes(buf)

    def readinto(self, buf: Buffer) -> int:
        """Fill ``buf`` with the next bytes; returns the count (0 = end of stream)."""
        out = memoryview(buf).cast("B")
        if self.kind is not StreamKind.SAVING:
            raise VfioError(errno.EBADF, f"{self.name} is a resuming stream: not readable")
        with self.lock:
            yield_point("stream read", self, write=False)
            if self.disabled:
                return self._disabled_read()
            if self.buffered == 0:
                if self.phase == "precopy":
                    raise VfioError(errno.ENOMSG, f"{self.name}: no pre-copy data right now")
                return 0
            return self._drain_into(out)

    def read_view(self, n: int) -> memoryview:
        """Like ``read(n)`` (same errors, same position), but the bytes come back as a
        read-only view of the data the session queued instead of a copy.

        This stands for a VMM reading into a transfer buffer it reuses: the copy costs
        nothing new per chunk.  A view stays meaningful only while the session's data
        does not change: after STOP_COPY (the device is stopped) until the session
        ends.  At most one queued chunk is returned per call.
        """
        if self.kind is not StreamKind.SAVING:
            raise VfioError(errno.EBADF, f"{self.name} is a resuming stream: not readable")
        with self.lock:
            yield_point("stream read", self, write=False)
            if self.disabled:
                self._disabled_read()  # raises, or 0: end of stream
                return memoryview(b"")
            if self.buffered == 0:
                if self.phase == "precopy":
                    raise VfioError(errno.ENOMSG, f"{self.name}: no pre-copy data right now")
                return memoryview(b"")
            head = self._chunks[0]
            take = min(len(head), max(n, 0))
            if take == len(head):
                self._chunks.popleft()
            else:
                self._chunks[0] = head[take:]
            self.pos += take
            return head[:take].toreadonly()

    def _disabled_read(self) -> int:
        if self.disabled_read == "enodev":
            raise VfioError(errno.ENODEV, f"{self.name} was disabled")
        if self.pos > 0:
            raise VfioError(errno.EINVAL, f"{self.name}: position beyond the freed buffer")
        return 0

    def _drain_into(self, out: memoryview) -> int:
        done = 0
        while done < len(out) and self._chunks:
            head = self._chunks[0]
            take = min(len(head), len(out) - done)
            out[done : done + take] = head[:take]
            done += take
            if take == len(head):
                self._chunks.popleft()
            else:
                self._chunks[0] = head[take:]
        self.pos += done
        return done

    def write(self, data: Buffer) -> int:
        """Write resume data; returns the bytes accepted (may be short, like write(2))."""
        if self.kind is not StreamKind.RESUMING:
            raise VfioError(errno.EBADF, f"{self.name} is a saving stream: not writable")
        owner = self.owner
        if owner is None:
            raise VfioError(errno.ENODEV, f"{self.name} was disabled")
        return owner.stream_write(self, memoryview(data).cast("B"))

    def write_all(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = self.write(view)
            view = view[n:]

    def pread(self, n: int, offset: int) -> bytes:
        raise VfioError(errno.ESPIPE, f"{self.name} is a stream: no pread")

    def pwrite(self, data: Buffer, offset: int) -> int:
        raise VfioError(errno.ESPIPE, f"{self.name} is a stream: no pwrite")

    def ioctl(self, cmd: int, arg: Buffer) -> int:
        """``VFIO_MIG_GET_PRECOPY_INFO`` on the data fd (the only ioctl it knows)."""
        if cmd != VFIO_MIG_GET_PRECOPY_INFO or self.kind is not StreamKind.SAVING:
            raise VfioError(errno.ENOTTY, f"ioctl {cmd:#x} unknown on {self.name}")
        argsz, user_flags, _, _ = PRECOPY_INFO.unpack(copy_in(arg, 0, PRECOPY_INFO.size))
        if argsz < PRECOPY_INFO.size:
            raise VfioError(errno.EINVAL, f"precopy info argsz {argsz} < {PRECOPY_INFO.size}")
        info = self.precopy_info(user_flags)
        out = PRECOPY_INFO.pack(argsz, info.flags, info.initial_bytes, info.dirty_bytes)
        copy_out(arg, 0, out)
        return 0

    def precopy_info(self, user_flags: int = 0) -> PrecopyInfo:
        owner = self.owner
        if owner is None:
            raise VfioError(errno.ENODEV, f"{self.name} was disabled")
        return owner.stream_precopy_info(self, user_flags)

    def __repr__(self) -> str:
        return (f"DataStream({self.name}, {self.kind.value}, pos={self.pos}, "
                f"refs={self.refcount}, disabled={self.disabled})")  # fmt: skip


class FdTable:
    """One process's file descriptor table: lowest-free allocation, reserve then install."""

    def __init__(self, limit: int = 1024, first: int = 3) -> None:
        self.limit = limit
        self.first = first
        #: invariant: reserved and installed numbers are disjoint
        self.reserved: set[int] = set()
        self.files: dict[int, DataStream] = {}

    def reserve(self) -> int:
        for fd in range(self.first, self.limit):
            if fd not in self.reserved and fd not in self.files:
                self.reserved.add(fd)
                return fd
        raise VfioError(errno.EMFILE, "fd table full")

    def install(self, fd: int, stream: DataStream) -> None:
        self.reserved.remove(fd)
        self.files[fd] = stream

    def put_unused(self, fd: int) -> None:
        self.reserved.discard(fd)

    def get(self, fd: int) -> DataStream:
        try:
            return self.files[fd]
        except KeyError:
            raise VfioError(errno.EBADF, f"fd {fd} is not open") from None

    def close(self, fd: int) -> None:
        self.get(fd).close()
        del self.files[fd]
