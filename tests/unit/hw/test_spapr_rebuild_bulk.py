"""The vectorised replay on the destination leaves exactly the per-entry replay's state."""

from __future__ import annotations

import numpy as np
import pytest

from vmferry.hw.spapr import SpaprIommu, WindowSpec
from vmferry.hw.spapr.hcall import Hcall, HRet
from vmferry.hw.spapr.hostmem import HostMemoryMap, Memslot
from vmferry.hw.spapr.tce import TCE_PCI_READ, TCE_PCI_WRITE, encode_tce_list
from vmferry.testing.memory import ByteMemory

LIOBN = 0x80000000
RAM = 64 << 20
MIB = 1 << 20


def host(hpa: int, backing: tuple[int, int] = (16, 16)) -> HostMemoryMap:
    half = RAM // 2
    return HostMemoryMap(
        [
            Memslot(0, half, hpa << 1, hpa, backing[0]),
            Memslot(half, half, (hpa << 1) + half, hpa + half, backing[1]),
        ]
    )


def build(hostmap: HostMemoryMap, page_shift: int, hw_shift: int, groups: int) -> SpaprIommu:
    window = WindowSpec(LIOBN, 1 << 32, 1 << 30, page_shift)
    return SpaprIommu(
        ByteMemory(RAM),
        [window],
        hw_page_shift=hw_shift,
        host=hostmap,
        groups=groups,
        shared_tables=groups == 1,
    )


def state_of(io: SpaprIommu) -> tuple[object, ...]:
    tables = [(t.tces.tobytes(), t.ua_cache.tobytes()) for t in io.hw_tables(LIOBN)]
    regions = [(r.ua, r.mapped, r.dirty.tobytes()) for r in io.mm.regions]
    return tuple(tables), tuple(regions)


@pytest.mark.parametrize(
    ("page_shift", "hw_shift", "groups", "dst_backing", "clears"),
    [
        (16, 16, 1, (16, 16), False),
        (24, 16, 2, (24, 16), False),
        (24, 24, 1, (24, 16), True),  # 16 MiB IOMMU pages over 64 KiB backing: cleared
        (16, 12, 1, (16, 16), False),
    ],
)
def test_bulk_replay_equals_the_per_entry_replay(
    page_shift: int, hw_shift: int, groups: int, dst_backing: tuple[int, int], clears: bool
) -> None:
    src = build(host(0x1000_0000_0000, (24, 24)), page_shift, hw_shift, groups)
    rng = np.random.default_rng(7)
    page = 1 << page_shift
    n = min(300, ((1 << 30) >> page_shift) - 8)
    gpas = rng.integers(0, RAM // page, n).astype(np.uint64) << np.uint64(page_shift)
    perms = rng.choice([TCE_PCI_READ, TCE_PCI_WRITE, TCE_PCI_READ | TCE_PCI_WRITE, 0], n)
    tces = gpas | perms.astype(np.uint64)
    src.memory.write(0, encode_tce_list(tces))
    first = (1 << 32) + 8 * page
    assert src.hcall(Hcall.H_PUT_TCE_INDIRECT, LIOBN, first, 0, n).ret == HRet.H_SUCCESS
    state = src.save()
    fast = build(host(0x3000_0000_0000, dst_backing), page_shift, hw_shift, groups)
    slow = build(host(0x3000_0000_0000, dst_backing), page_shift, hw_shift, groups)
    # the destination held mappings of its own before the replay
    for io in (fast, slow):
        assert io.hcall(Hcall.H_PUT_TCE, LIOBN, 1 << 32, 0x10000 | TCE_PCI_WRITE).ret == 0
    slow.kvm.vectorised = False
    r_fast, r_slow = fast.restore(state), slow.restore(state)
    assert r_fast == r_slow
    assert r_fast.mapped + r_fast.cleared == int(np.count_nonzero(perms))
    assert (r_fast.cleared > 0) == clears
    assert state_of(fast) == state_of(slow)
    for hw in fast.hw_tables(LIOBN):  # the vectorised path ran: one kill for the window
        assert (hw.offset, hw.size) in hw.kill_log
    for hw in slow.hw_tables(LIOBN):
        assert (hw.offset, hw.size) not in hw.kill_log
    fast.check_invariants()
    slow.check_invariants()
