"""The pseries receive-DMA devices: a device and its guest driver as a migration handler."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.errors import ConfigError
from vmferry.guest.dma import GuestDmaError, GuestDmaWindow
from vmferry.guest.dma_driver import RxRingDriver
from vmferry.hw.spapr.dmadev import (
    MAX_RING,
    DmaDeviceError,
    SpaprDmaEngine,
    decode_state,
    encode_state,
    ring_bytes,
)
from vmferry.machine.handlers import BlobHandler, ComponentData, StatePiece
from vmferry.machine.pseries_tce import SpaprTceHandler
from vmferry.machine.ram import PAGE_64K, GuestRam
from vmferry.machine.vm import VM

_DEVICE_KEYS = {"name", "liobn", "buffers", "buffer_kib", "rate_mbps"}


# --- DMA devices ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DmaDeviceSpec:
    name: str
    liobn: int
    buffers: int = 8
    buffer_kib: int = 16
    rate_mbps: float = 4.0

    @classmethod
    def from_definition(cls, d: object) -> DmaDeviceSpec:
        if not isinstance(d, Mapping) or set(d) - _DEVICE_KEYS or not {"name", "liobn"} <= set(d):
            raise ConfigError(
                f"dma device {d!r}: keys are {sorted(_DEVICE_KEYS)} (name, liobn required)"
            )
        name = d["name"]
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"dma device name {name!r} must be an identifier")
        ints = {k: d.get(k, getattr(cls, k, 0)) for k in ("liobn", "buffers", "buffer_kib")}
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints.values()):
            raise ConfigError(f"dma device {name}: liobn, buffers, buffer_kib must be integers")
        rate = d.get("rate_mbps", cls.rate_mbps)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or rate <= 0:
            raise ConfigError(f"dma device {name}: rate_mbps must be positive")
        if not 1 <= ints["buffers"] <= MAX_RING or not 1 <= ints["buffer_kib"] <= 1024:
            raise ConfigError(
                f"dma device {name}: buffers in [1, {MAX_RING}], buffer_kib in [1, 1024]"
            )
        return cls(name, ints["liobn"], ints["buffers"], ints["buffer_kib"], float(rate))

    @property
    def area_bytes(self) -> int:
        """Ring page, TCE list page and twice the posted buffers, in 64 KiB guest pages."""
        pool = 2 * self.buffers * -(-self.buffer_kib * 1024 // 4096) * 4096
        return pages64(ring_bytes(self.buffers)) + PAGE_64K + pages64(pool)


def pages64(n: int) -> int:
    return -(-n // PAGE_64K) * PAGE_64K


class SpaprDmaHandler(BlobHandler):
    """One DMA device (registers migrate as a component) and its guest driver (state in
    guest RAM: it migrates with memory and re-attaches on the destination)."""

    def __init__(
        self,
        vm: VM,
        spec: DmaDeviceSpec,
        tce: SpaprTceHandler,
        guest_window: GuestDmaWindow,
        group: int,
        area_gpa: int,
    ) -> None:
        self.spec, self.tce = spec, tce
        tce.untracked_liobns.add(spec.liobn)
        self.name = f"spapr-dma:{spec.name}"
        tag = xxhash.xxh64_intdigest(spec.name.encode())
        self.device = SpaprDmaEngine(
            tce.iommu, liobn=spec.liobn, group=group, tag=tag, rate_mbps=spec.rate_mbps
        )
        ring_gpa = area_gpa
        list_page = ring_gpa + pages64(ring_bytes(spec.buffers))
        self.driver = RxRingDriver(
            guest_window,
            vm.ram,
            ring_gpa=ring_gpa,
            pool_gpa=list_page + PAGE_64K,
            slots=2 * spec.buffers,
            buf_len=spec.buffer_kib * 1024,
            tag=tag,
        )
        self.driver_error = ""

    def advance(self, seconds: float) -> None:
        if self.driver_error:
            return
        try:
            if not self.driver.attached:
                if self.device.programmed:
                    self.driver.attach()  # resumed after a migration
                else:
                    self.device.program(*self.driver.probe())
            self.device.run(seconds)
            self.tce.mark_dma_writable()  # before the driver unmaps what the device wrote
            self.driver.poll()
        except (GuestDmaError, DmaDeviceError) as exc:
            self.driver_error = str(exc)

    def report(self) -> dict[str, Any]:
        dev = self.device
        out: dict[str, Any] = {
            "liobn": dev.liobn,
            "group": dev.group,
            "ring_ioba": dev.ring_ioba,
            "head": dev.head,
            "dma_count": dev.seq,
            "dma_bytes": dev.bytes,
            "faults": dev.faults,
            "halted": dev.halted,
            "driver_error": self.driver_error,
        }
        if self.driver.attached:
            st = self.driver.stats()
            out["driver"] = {"received": st.received, "corrupt": st.corrupt, "tail": st.tail}
        return out

    def save_complete(self) -> tuple[StatePiece, ...]:
        return (ComponentData(self.name, encode_state(self.device.save())),)

    def apply(self, data: bytes) -> None:
        self.device.restore(decode_state(data))

    def state_digest(self) -> str:
        return xxhash.xxh3_128_hexdigest(encode_state(self.device.save()))


class DeviceDma:
    """Guest RAM as devices write it: the CPU's dirty log does not see DMA."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram, self.size = ram, ram.size

    def read(self, gpa: int, n: int) -> bytes:
        return self.ram.read(gpa, n)

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        self.ram.device_write(gpa, data)


# --- the workload stays out of the DMA area ----------------------------------------------


class PagesBelow:
    """The guest's application memory: RAM below the kernel's DMA area."""

    def __init__(self, ram: GuestRam, npages: int) -> None:
        self.ram, self.npages, self.page_size = ram, npages, ram.page_size

    def poke_words(
        self, index: npt.NDArray[np.int64], word: int, values: npt.NDArray[np.uint64]
    ) -> None:
        self.ram.poke_words(index, word, values)
