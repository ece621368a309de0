"""pds-like driver: STOP_COPY (optionally P2P), the whole state as one firmware blob.

Like ``drivers/vfio/pci/pds``: STOP -> STOP_COPY issues one SAVE into a file of exactly
the state size; reads return bytes up to that size, then 0.  STOP -> RESUMING allocates
a buffer of the state size; writes append and a write with no room left fails EINVAL.
RESUMING -> STOP issues one RESTORE of the buffer, which the firmware validates.  A
disabled file is freed to size 0 (read at position 0 returns 0, beyond it EINVAL); a
firmware recovery may put the device in ERROR, after which every SET fails EIO.

Blob layout (the firmware's; the model's own choice of fields)::

    0  magic 'PDSL' | version u16 | reserved u16
    8  payload_len u64 | payload xxh3-64 u64 | tick u64
    32 payload: the device image (state size - 32 bytes)

The blob header is a persist layout (:data:`BLOB_LAYOUT`, version 1, little-endian: the
bytes above, as every release wrote them, so a destination of any release reads it); its
plain state is :class:`BlobHeader`.  RESTORE refuses, with EINVAL naming what is wrong, a
blob whose header does not decode (magic, version, size), whose payload checksum differs,
or whose device image header does not (:class:`~vmferry.hw.vfio.drivers.image.ImageHeader`).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import xxhash

from vmferry.errors import StreamDecodeError
from vmferry.hw.memory import GuestMemory
from vmferry.hw.persist import Field, Layout
from vmferry.hw.vfio.drivers.base import DeviceCapability, DmaRegion
from vmferry.hw.vfio.drivers.image import ImageDriver, ImageHeader, device_memory
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.states import MigrationFlags
from vmferry.hw.vfio.stream import DataStream, DisabledRead

BLOB_MAGIC = b"PDSL"
BLOB_VERSION = 1
BLOB_LAYOUT = Layout("pds blob", BLOB_MAGIC, BLOB_VERSION, (
    Field("reserved", "u16"), Field("payload_len", "u64"), Field("digest", "u64"),
    Field("tick", "u64"),
), endian="<")  # fmt: skip
BLOB_HEADER = BLOB_LAYOUT.fixed
#: PDS_LM_DEVICE_STATE_LENGTH
PDS_STATE_LENGTH = 65536


@dataclass(frozen=True)
class BlobHeader:
    """The plain state of a blob header: payload length, its xxh3-64, the device tick."""

    payload_len: int
    digest: int
    tick: int

    def encode(self) -> bytes:
        """The header's bytes; cannot fail for a header of the declared types."""
        return BLOB_LAYOUT.encode({"reserved": 0, "payload_len": self.payload_len,
                                   "digest": self.digest, "tick": self.tick})

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> BlobHeader:
        """BadMagic, UnsupportedVersion, TruncatedRecord or MalformedRecord if not a header."""
        v = BLOB_LAYOUT.decode(data)
        return cls(v["payload_len"], v["digest"], v["tick"])


@dataclass
class _Restore:
    """The resuming file's buffer: blob header, then payload.

    Invariant: ``written`` <= BLOB_HEADER.size + len(payload).
    """

    header: bytearray
    payload: np.ndarray
    written: int = 0


class PdsDriver(ImageDriver):
    name: ClassVar[str] = "pds"
    disabled_read: ClassVar[DisabledRead] = "pds"
    error_state_errno: ClassVar[int] = errno.EIO

    def __init__(self, memory: GuestMemory, dma: DmaRegion, seed: int,
                 state_size: int = PDS_STATE_LENGTH, p2p: bool = False) -> None:  # fmt: skip
        self.flags = MigrationFlags.STOP_COPY | (MigrationFlags.P2P if p2p else 0)
        self.state_size = state_size
        #: resume staging buffer (never the live image)
        self._staging: np.ndarray | None = None
        super().__init__(memory, dma, seed, state_size - BLOB_HEADER.size)

    def data_size(self) -> int:
        return self.state_size

    def capability(self) -> DeviceCapability:
        return DeviceCapability(self.name, self.flags, self.state_size,
                                (("state_size", self.state_size),))  # fmt: skip

    def _restore_buffer(self) -> np.ndarray:
        """The page-backed resume buffer, allocated once and reused per session.

        Allocated with its pages present, as the driver allocates the restore file's
        pages when the session opens (STOP -> RESUMING), not when data arrives."""
        if self._staging is None:
            self._staging = device_memory(self.image_size)
            self._staging.fill(0)  # fault every page in now
        return self._staging

    def _save_open(self, stream: DataStream, *, precopy: bool) -> None:
        """The SAVE: the device is stopped, so the file serves its memory in place.

        Only a disabled file is safe from the device running again: with the ``stale_fd``
        fault the orphaned file keeps this view and reads live device state later.
        """
        _, tick, _, _, _ = self.header()
        digest = xxhash.xxh3_64_intdigest(self.image.data)
        stream.append(BlobHeader(self.image_size, digest, tick).encode())
        stream.append(self.image.data.toreadonly())

    def _save_final(self, stream: DataStream) -> None:
        raise VfioError(errno.EINVAL, "pds has no pre-copy")

    def _resume_open(self, stream: DataStream) -> None:
        stream.parser = _Restore(bytearray(BLOB_HEADER.size), self._restore_buffer())

    def _restore(self, stream: DataStream) -> _Restore:
        restore = stream.parser
        if not isinstance(restore, _Restore):
            raise VfioError(errno.EBADF, f"{stream.name} is not a resuming stream")
        return restore

    def resume_write(self, stream: DataStream, data: memoryview) -> int:
        restore = self._restore(stream)
        room = self.state_size - restore.written
        if room == 0 and len(data):
            raise VfioError(errno.EINVAL, f"resume data beyond {self.state_size} bytes")
        n = min(room, len(data))
        at, hdr = restore.written, BLOB_HEADER.size
        head = max(0, min(n, hdr - at))
        if head:
            restore.header[at : at + head] = data[:head]
        if n > head:
            start = at + head - hdr
            restore.payload[start : start + n - head] = np.frombuffer(data[head:n], np.uint8)
        restore.written += n
        return n

    def _resume_commit(self, stream: DataStream) -> None:
        restore = self._restore(stream)
        if restore.written != self.state_size:
            raise VfioError(errno.EINVAL, f"RESTORE of {restore.written} bytes, "
                            f"blob is {self.state_size}")  # fmt: skip
        try:
            head = BlobHeader.decode(restore.header)
        except StreamDecodeError as exc:
            raise VfioError(errno.EINVAL, f"RESTORE: {exc}") from exc
        if head.payload_len != self.image_size:
            raise VfioError(errno.EINVAL, f"RESTORE: blob payload of {head.payload_len} "
                            f"bytes, this device's image is {self.image_size}")  # fmt: skip
        if xxhash.xxh3_64_intdigest(restore.payload.data) != head.digest:
            raise VfioError(errno.EINVAL, "RESTORE: blob checksum mismatch")
        try:
            ImageHeader.decode(restore.payload.data)
        except StreamDecodeError as exc:
            raise VfioError(errno.EINVAL, f"RESTORE: {exc}") from exc
        # load by swapping the staging buffer in; the old image becomes the next staging
        self.image, self._staging = restore.payload, self.image
        restore.payload = self._staging

    def _resume_load_unchecked(self, stream: DataStream) -> None:
        restore = self._restore(stream)
        n = max(0, restore.written - BLOB_HEADER.size)
        self.image[:n] = restore.payload[:n]
