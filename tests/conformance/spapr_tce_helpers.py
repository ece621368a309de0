"""Shared builders for the sPAPR TCE conformance checks."""

from __future__ import annotations

from collections.abc import Callable

from vmferry.hw.spapr.hcall import HcallResult
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec
from vmferry.testing.memory import ByteMemory

LIOBN = 0x80000000
RAM = 64 << 20


class SpyMemory(ByteMemory):
    """ByteMemory that logs reads and can fire a callback on the n-th read of an address."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads: list[tuple[int, int]] = []
        self.triggers: list[tuple[int, int, Callable[[], None]]] = []  # (gpa, nth, action)
        self._hits: dict[int, int] = {}

    def read(self, gpa: int, n: int) -> bytes:
        data = super().read(gpa, n)
        self.reads.append((gpa, n))
        for tgpa, nth, action in list(self.triggers):
            if gpa <= tgpa < gpa + n:
                self._hits[tgpa] = self._hits.get(tgpa, 0) + 1
                if self._hits[tgpa] == nth:
                    self.triggers.remove((tgpa, nth, action))
                    action()
        return data


def make(
    mode: str = "correct",
    *,
    page_shift: int = 12,
    hw_page_shift: int = 12,
    size: int = 1 << 30,
    offset: int = 0,
    in_kernel: bool = True,
    ram: int = RAM,
    **kw: object,
) -> SpaprIommu:
    mem = SpyMemory(ram)
    spec = WindowSpec(LIOBN, offset, size, page_shift, in_kernel)
    return SpaprIommu(mem, [spec], mode=mode, hw_page_shift=hw_page_shift, **kw)  # type: ignore[arg-type]


def call(io: SpaprIommu, opcode: int, *args: int, vcpu: int = 0) -> HcallResult:
    """A guest hypercall followed by the INV checks (docs/models/spapr-tce.md §11: after every
    hypercall)."""
    result = io.hcall(opcode, *args, vcpu=vcpu)
    assert result.ret != 9999, "H_TOO_HARD reached the guest"
    io.check_invariants()
    return result


def snapshot(io: SpaprIommu) -> tuple[object, ...]:
    """Everything an hcall could change, for 'nothing changed' assertions."""
    hw = tuple(
        (t.name, t.tces.tobytes(), t.ua_cache.tobytes())
        for tables in io.container.windows.values()
        for t in tables
    )
    views = tuple(
        (liobn, t.view.dense().tobytes(), tuple(sorted(t.view.pages)))
        for liobn, t in io.qemu.tables.items()
    )
    counts = tuple((r.ua, r.used, r.mapped, r.pinned) for r in io.mm.regions)
    return hw, views, counts
