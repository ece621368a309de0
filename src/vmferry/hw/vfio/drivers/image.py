"""A device whose internal state is one memory image: queues, counters, a descriptor ring.

Image layout (little-endian)::

    0   magic u32 'VDEV' | version u16 | nqueues u16
    8   seed u64          (the device's random stream lives in its state)
    16  tick u64          (work items processed)
    24  dma_head u64      (next completion slot in the guest DMA ring)
    32  dma_bytes u64
    40  queue heads u32 x 4
    56  reserved u64
    64  descriptor slots, 64 bytes each, to the end of the image

The header is declared once as a persist layout (:data:`IMAGE_LAYOUT`, version 1,
little-endian: the bytes above); the running device updates it in place through the
layout's struct, and an image that arrives from elsewhere is checked with
:meth:`ImageHeader.decode` (typed errors naming what is wrong).

Each tick picks a queue and a slot from (seed, tick), writes a descriptor into the slot,
bumps the counters and DMAs a 64-byte completion into the guest ring.  The pages it
touches are recorded while dirty tracking is on (pre-copy).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import xxhash

from vmferry.errors import ConfigError, MalformedRecord
from vmferry.hw.memory import GuestMemory
from vmferry.hw.persist import Field, Layout
from vmferry.hw.vfio.drivers.base import DmaRegion, VariantDriver, tick_word

MAGIC = b"VDEV"
IMAGE_VERSION = 1
NQUEUES = 4
IMAGE_LAYOUT = Layout("device image", MAGIC, IMAGE_VERSION, (
    Field("nqueues", "u16"), Field("seed", "u64"), Field("tick", "u64"),
    Field("dma_head", "u64"), Field("dma_bytes", "u64"),
    *(Field(f"head{q}", "u32") for q in range(NQUEUES)), Field("reserved", "u64"),
), endian="<")  # fmt: skip
HEADER = IMAGE_LAYOUT.fixed
SLOT = 64
PAGE = 4096
#: device memory at least this large is backed by transparent huge pages
HUGE = 2 << 20


@dataclass(frozen=True)
class ImageHeader:
    """The plain state of a device image's header (see the module docstring)."""

    seed: int
    tick: int = 0
    dma_head: int = 0
    dma_bytes: int = 0
    heads: tuple[int, ...] = (0,) * NQUEUES

    def encode(self) -> bytes:
        """The header's bytes; cannot fail for a header of the declared types."""
        values = {"nqueues": NQUEUES, "seed": self.seed, "tick": self.tick,
                  "dma_head": self.dma_head, "dma_bytes": self.dma_bytes, "reserved": 0,
                  **{f"head{q}": h for q, h in enumerate(self.heads)}}  # fmt: skip
        return IMAGE_LAYOUT.encode(values)

    @classmethod
    def decode(cls, image: bytes | memoryview) -> ImageHeader:
        """The header at the start of ``image``: BadMagic, UnsupportedVersion,
        TruncatedRecord or MalformedRecord (a queue count this model does not have)."""
        v, _ = IMAGE_LAYOUT.decode_head(image)
        if v["nqueues"] != NQUEUES:
            raise MalformedRecord(f"device image: {v['nqueues']} queues, the device has "
                                  f"{NQUEUES}", 6)
        return cls(v["seed"], v["tick"], v["dma_head"], v["dma_bytes"],
                   tuple(v[f"head{q}"] for q in range(NQUEUES)))


def device_memory(size: int) -> np.ndarray:
    """Zeroed device memory: anonymous pages, huge pages for large buffers (as guest RAM),
    so faulting a big device image in costs 2 MiB at a time, not 4 KiB."""
    if size < HUGE:
        return np.zeros(size, dtype=np.uint8)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(region, dtype=np.uint8)


class ImageDriver(VariantDriver):
    """Shared hardware model of the pds-like and mlx5-like drivers."""

    MIN_IMAGE: ClassVar[int] = HEADER.size + SLOT

    def __init__(self, memory: GuestMemory, dma: DmaRegion, seed: int, image_size: int) -> None:
        if image_size < self.MIN_IMAGE:
            raise ConfigError(f"{self.name}: device image of {image_size} bytes is too small")
        super().__init__(memory, dma, seed)
        self.image_size = image_size
        self.image = device_memory(image_size)
        #: pages changed since tracking started; None when not tracking
        self.dirty: set[int] | None = None
        self._power_on()

    def hw_reset(self) -> None:
        self.image[:] = 0
        self._power_on()

    def _power_on(self) -> None:
        """The header of a device just out of reset (the rest of the image is zero)."""
        self.image[: HEADER.size] = np.frombuffer(ImageHeader(self.seed).encode(), np.uint8)
        self.dirty = None  # a reset ends any pre-copy tracking

    def header(self) -> tuple[int, int, int, int, list[int]]:
        """(seed, tick, dma_head, dma_bytes, queue heads) read from the image."""
        f = HEADER.unpack_from(self.image.data, 0)
        return f[3], f[4], f[5], f[6], list(f[7:11])

    def _advance(self) -> None:
        seed, tick, dma_head, dma_bytes, heads = self.header()
        word = tick_word(seed, tick)
        queue = word % NQUEUES
        slots = (self.image_size - HEADER.size) // SLOT
        slot = (word >> 8) % slots
        desc = (
            struct.pack("<QQQQ", tick, word, queue, heads[queue]) + word.to_bytes(8, "little") * 4
        )
        offset = HEADER.size + slot * SLOT
        self.image[offset : offset + SLOT] = np.frombuffer(desc, dtype=np.uint8)
        heads[queue] += 1
        HEADER.pack_into(self.image.data, 0, MAGIC, IMAGE_VERSION, NQUEUES, seed, tick + 1,
                         dma_head + 1, dma_bytes + SLOT, *heads, 0)  # fmt: skip
        self.dma_write(dma_head, struct.pack("<QQII", tick, word, queue, heads[queue]).ljust(SLOT))
        if self.dirty is not None:
            self.dirty.update((0, offset // PAGE, (offset + SLOT - 1) // PAGE))

    def state_digest(self) -> str:
        return xxhash.xxh64_hexdigest(self.image.data)
