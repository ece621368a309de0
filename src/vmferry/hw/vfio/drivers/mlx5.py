"""mlx5-like driver: STOP_COPY | P2P | PRE_COPY, a record-structured stream.

Stream = records, each a 16-byte header ``record_size le64 | flags le32 | tag le32``
followed by ``record_size`` bytes.  Tags: 0 FW_DATA (a device image), 1 STOP_COPY_SIZE
(optional, 8-byte payload: how big a buffer the target should prepare).  flags bit 0
(TAG_OPTIONAL) lets a reader skip records it does not know; an unknown mandatory tag is
EOPNOTSUPP and a record above the LOAD limit ENOMEM; either puts the file in error.

FW_DATA payload (the firmware's image format; the model's own fields), little-endian,
declared once as :data:`IMAGE_LAYOUT` with its two versions, told apart by the magic (the
format has no version field; the record stream around it is the kernel's)::

    0  magic | kind u16 (1 FULL, 2 DELTA) | flags u16 (bit0 FINAL)
    8  npages u32 | version 1: reserved u32 (0), version 2: image_pages u32 | tick u64
    24 image xxh64 after applying u64 | payload xxh64 u64
    40 FULL: the whole image.  DELTA: npages page numbers (u32) then the pages.

Version 1 (magic 'MLXI') is what every release wrote; version 2 (magic 'MLI2') names the
size of the image it applies to, so a destination refuses an image of another device
size by name before it touches its staging memory.  The source writes the version the
destination announced at pre-flight (``write_version``), version 1 to a destination that
announces nothing.

Saving: RUNNING -> PRE_COPY queues STOP_COPY_SIZE + a FULL image (the initial bytes) and
starts dirty tracking; the precopy-info query starts an incremental DELTA save when the
buffered data is consumed and the device has dirtied pages (a query with a side effect,
as in mlx5).  PRE_COPY_P2P -> STOP_COPY queues the FINAL delta; STOP -> STOP_COPY queues
STOP_COPY_SIZE + a FINAL full image.  Resuming: a byte-driven parser (arbitrary write
segmentation works) loads complete images into staging device memory; RESUMING -> STOP
adopts it (no copy) only when the stream ended on a record boundary after a FINAL image
whose digest matches (mlx5 itself cannot notice a cut stream there; the model's correct
mode does).
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import xxhash

from vmferry.errors import MalformedRecord, StreamDecodeError
from vmferry.hw.memory import GuestMemory
from vmferry.hw.persist import TAG4, Field, StructLayout, StructVersion, enum16
from vmferry.hw.vfio.drivers.base import DeviceCapability, DmaRegion
from vmferry.hw.vfio.drivers.image import PAGE, ImageDriver, device_memory
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.states import DeviceState, MigrationFlags
from vmferry.hw.vfio.stream import DataStream, PrecopyInfo

RECORD = struct.Struct("<QII")
TAG_FW_DATA = 0
TAG_STOP_COPY_SIZE = 1
TAG_OPTIONAL = 1 << 0
FLAG_FINAL = 1 << 0


class ImageKind(enum.IntEnum):
    """What a FW_DATA image holds (encoded by these values)."""

    FULL = 1
    DELTA = 2


def _image_fields(fourth: str) -> tuple[Field, ...]:
    return (enum16("kind", ImageKind), Field("flags", "u16"), Field("npages", "u32"),
            Field(fourth, "u32"), Field("tick", "u64"), Field("digest", "u64"),
            Field("payload_hash", "u64"))  # fmt: skip


IMAGE_LAYOUT = StructLayout("mlx5 image", Field("magic", TAG4), (
    StructVersion(1, b"MLXI", _image_fields("reserved")),
    StructVersion(2, b"MLI2", _image_fields("image_pages")),
))  # fmt: skip
#: the header's size, the same in every version
IMAGE_HEADER = IMAGE_LAYOUT.size(1)
assert all(IMAGE_LAYOUT.size(v.number) == IMAGE_HEADER for v in IMAGE_LAYOUT.versions)


@dataclass(frozen=True)
class ImageHead:
    """The plain state of a FW_DATA image header (see the module docstring)."""

    kind: ImageKind
    final: bool
    npages: int
    #: the whole image in pages (version 2; None in a version-1 header)
    image_pages: int | None
    tick: int
    digest: int
    payload_hash: int

    def encode(self, version: int) -> bytes:
        """The header's bytes in ``version``; cannot fail for a header of the declared
        types."""
        return IMAGE_LAYOUT.encode({
            "kind": self.kind, "flags": FLAG_FINAL if self.final else 0,
            "npages": self.npages, "reserved": 0, "image_pages": self.image_pages or 0,
            "tick": self.tick, "digest": self.digest, "payload_hash": self.payload_hash,
        }, version)  # fmt: skip

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> ImageHead:
        """A header of either version: UnsupportedVersion (an unknown magic),
        TruncatedRecord, or MalformedRecord (an unknown kind, flag or reserved bit)."""
        v = IMAGE_LAYOUT.decode(data)
        if v["flags"] & ~FLAG_FINAL or v.get("reserved", 0):
            raise MalformedRecord(f"mlx5 image: flags {v['flags']:#x} or reserved bits set")
        return cls(v["kind"], bool(v["flags"] & FLAG_FINAL), v["npages"],
                   v.get("image_pages"), v["tick"], v["digest"], v["payload_hash"])


@dataclass
class _Parser:
    """Resume parser state (READ_HEADER / READ_IMAGE / SKIP_DATA)."""

    phase: str = "header"
    header: bytearray = field(default_factory=bytearray)
    body: bytearray = field(default_factory=bytearray)
    need: int = 0
    staging: np.ndarray | None = None
    final_digest: int | None = None


class Mlx5Driver(ImageDriver):
    name: ClassVar[str] = "mlx5"
    STATE_VERSION: ClassVar[int] = IMAGE_LAYOUT.newest

    def __init__(self, memory: GuestMemory, dma: DmaRegion, seed: int,
                 state_size: int = 1 << 20) -> None:  # fmt: skip
        from vmferry.errors import ConfigError

        if state_size % PAGE:
            raise ConfigError(f"mlx5 state size {state_size} is not a multiple of {PAGE}")
        self.flags = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
        super().__init__(memory, dma, seed, state_size)
        self.npages = state_size // PAGE
        self.load_limit = IMAGE_HEADER + state_size + 4 * self.npages

    def full_size(self) -> int:
        """A whole saving session from STOP: STOP_COPY_SIZE and one FULL image."""
        return 2 * RECORD.size + 8 + IMAGE_HEADER + self.image_size

    def data_size(self) -> int:
        """``stop_copy_length``: what STOP_COPY will produce.  From STOP that is the whole
        image; in pre-copy it is the FINAL delta, the pages dirtied since the last read
        (the initial image and buffered deltas are pre-copy data, reported by the
        precopy-info ioctl, and are read before the final delta either way)."""
        stream = self.saving
        if stream is not None and stream.phase == "precopy" and self.dirty is not None:
            return RECORD.size + IMAGE_HEADER + len(self.dirty) * (4 + PAGE)
        return self.full_size()

    def capability(self) -> DeviceCapability:
        return DeviceCapability(self.name, self.flags, self.full_size(),
                                (("state_size", self.image_size),))  # fmt: skip

    # --- saving ---------------------------------------------------------------------------

    def _record(self, tag: int, flags: int, payload: bytes | memoryview) -> list[memoryview]:
        return [memoryview(RECORD.pack(len(payload), flags, tag)), memoryview(payload)]

    def _image_record(self, kind: ImageKind, final: bool) -> list[memoryview]:
        if kind == ImageKind.FULL:
            pages: list[int] = []
            payload = memoryview(self.image.copy().data)
        else:
            pages = sorted(self.dirty or ())
            index = np.asarray(pages, dtype="<u4")
            body = self.image.reshape(self.npages, PAGE)[index]
            payload = memoryview(index.tobytes() + body.tobytes())
        if self.dirty is not None:
            self.dirty = set()
        _, tick, _, _, _ = self.header()
        head = ImageHead(kind, final, len(pages), self.npages, tick,
                         xxhash.xxh64_intdigest(self.image.data),
                         xxhash.xxh64_intdigest(payload)).encode(self.write_version)
        rec = RECORD.pack(IMAGE_HEADER + len(payload), 0, TAG_FW_DATA)
        return [memoryview(rec + head), payload]

    def _append(self, stream: DataStream, parts: list[memoryview]) -> None:
        for part in parts:
            stream.append(part)

    def _save_open(self, stream: DataStream, *, precopy: bool) -> None:
        size = struct.pack("<Q", self.full_size())
        self._append(stream, self._record(TAG_STOP_COPY_SIZE, TAG_OPTIONAL, size))
        self.dirty = set() if precopy else None
        self._append(stream, self._image_record(ImageKind.FULL, final=not precopy))
        stream.initial_total = stream.appended if precopy else 0

    def _save_final(self, stream: DataStream) -> None:
        self._append(stream, self._image_record(ImageKind.DELTA, final=True))
        self.dirty = None
        stream.phase = "final"

    def _end_saving(self, cur: DeviceState) -> None:
        self.dirty = None
        super()._end_saving(cur)

    def precopy_query(self, stream: DataStream, state: DeviceState) -> PrecopyInfo:
        if stream.pos < stream.initial_total:
            return PrecopyInfo(stream.initial_total - stream.pos, 0)
        tracking = state == DeviceState.PRE_COPY and bool(self.dirty)
        if stream.buffered == 0 and tracking:
            self._append(stream, self._image_record(ImageKind.DELTA, final=False))
            return PrecopyInfo(0, stream.buffered)
        pending = len(self.dirty or ()) * (PAGE + 4) if tracking else 0
        return PrecopyInfo(0, stream.buffered + pending)

    def trigger_reinit(self) -> None:
        """The device gained new initial state (reconfiguration): re-base pre-copy."""
        stream = self.saving
        if stream is None or stream.phase != "precopy":
            raise VfioError(errno.EINVAL, "no pre-copy session to re-initialise")
        with stream.lock:
            self._append(stream, self._image_record(ImageKind.FULL, final=False))
            stream.initial_total = stream.appended
            stream.reinit_pending = True

    # --- resuming ---------------------------------------------------------------------------

    def _resume_open(self, stream: DataStream) -> None:
        stream.parser = _Parser()

    def _parser(self, stream: DataStream) -> _Parser:
        parser = stream.parser
        if not isinstance(parser, _Parser):
            raise VfioError(errno.EBADF, f"{stream.name} is not a resuming stream")
        return parser

    def resume_write(self, stream: DataStream, data: memoryview) -> int:
        parser = self._parser(stream)
        try:
            at = 0
            while at < len(data):
                at += self._feed(parser, data[at:])
        except VfioError:
            stream.errored = True
            raise
        return len(data)

    def _feed(self, p: _Parser, data: memoryview) -> int:
        if p.phase == "header":
            take = min(RECORD.size - len(p.header), len(data))
            p.header += data[:take]
            if len(p.header) == RECORD.size:
                self._on_header(p)
            return take
        take = min(p.need - len(p.body), len(data))
        p.body += data[:take]
        if len(p.body) == p.need:
            if p.phase == "image":
                self._load_image(p, memoryview(p.body))
            p.phase, p.body, p.header = "header", bytearray(), bytearray()
        return take

    def _on_header(self, p: _Parser) -> None:
        size, flags, tag = RECORD.unpack(p.header)
        if size > self.load_limit:
            raise VfioError(errno.ENOMEM, f"record of {size} bytes above the LOAD limit")
        if tag == TAG_FW_DATA:
            p.phase = "image"
        elif tag == TAG_STOP_COPY_SIZE or flags & TAG_OPTIONAL:
            p.phase = "skip"
        else:
            raise VfioError(errno.EOPNOTSUPP, f"unknown mandatory record tag {tag}")
        p.need = size
        if size == 0:
            p.phase, p.header = "header", bytearray()

    def _load_image(self, p: _Parser, body: memoryview) -> None:
        if len(body) < IMAGE_HEADER:
            raise VfioError(errno.EINVAL, "FW_DATA record shorter than an image header")
        try:
            head = ImageHead.decode(body[:IMAGE_HEADER])
        except StreamDecodeError as exc:
            raise VfioError(errno.EINVAL, f"LOAD: {exc}") from exc
        if head.image_pages is not None and head.image_pages != self.npages:
            raise VfioError(errno.EINVAL, f"LOAD: image of {head.image_pages} pages, this "
                            f"device's is {self.npages}")  # fmt: skip
        kind, npages, digest = head.kind, head.npages, head.digest
        payload = body[IMAGE_HEADER:]
        if xxhash.xxh64_intdigest(payload) != head.payload_hash:
            raise VfioError(errno.EINVAL, "LOAD: corrupt device image")
        if kind == ImageKind.FULL and len(payload) == self.image_size:
            # device memory (huge pages), faulted in now: the commit adopts it as is
            p.staging = device_memory(self.image_size)
            np.copyto(p.staging, np.frombuffer(payload, dtype=np.uint8))
        elif kind == ImageKind.DELTA and p.staging is not None \
                and len(payload) == npages * (4 + PAGE):  # fmt: skip
            index = np.frombuffer(payload[: 4 * npages], dtype="<u4")
            if npages and int(index.max()) >= self.npages:
                raise VfioError(errno.EINVAL, "LOAD: page index beyond the image")
            pages = np.frombuffer(payload[4 * npages :], dtype=np.uint8)
            p.staging.reshape(self.npages, PAGE)[index] = pages.reshape(npages, PAGE)
        else:
            raise VfioError(errno.EINVAL, "LOAD: image does not apply (no base or bad size)")
        if xxhash.xxh64_intdigest(p.staging.data) != digest:
            raise VfioError(errno.EINVAL, "LOAD: image digest mismatch (foreign session?)")
        p.final_digest = digest if head.final else None

    def _resume_commit(self, stream: DataStream) -> None:
        if stream.errored:
            raise VfioError(errno.EIO, "resume file is in error")
        p = self._parser(stream)
        if p.phase != "header" or p.header:
            raise VfioError(errno.EINVAL, "resume stream ends inside a record")
        if p.staging is None or p.final_digest is None:
            raise VfioError(errno.EINVAL, "resume stream has no final device image")
        # the images were loaded into the staging memory as they arrived (most of them
        # during pre-copy); committing makes that memory the device's: no copy in the stop
        self.image, p.staging = p.staging, None

    def _resume_load_unchecked(self, stream: DataStream) -> None:
        p = self._parser(stream)
        if p.staging is not None:
            self.image[:] = p.staging
