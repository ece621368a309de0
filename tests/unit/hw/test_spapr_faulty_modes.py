"""Each faulty mode bites (and is detected); the vectorised paths equal the per-entry loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import ConfigError
from vmferry.guest.dma import GuestDmaError, GuestDmaWindow
from vmferry.hw.spapr.hcall import Hcall, HRet
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec
from vmferry.hw.spapr.tce import (
    MODES,
    DmaDirection,
    DmaFault,
    encode_tce_list,
)
from vmferry.testing.memory import ByteMemory

LIOBN = 0x80000000
RAM = 16 << 20
RW = 3


def build(mode: str = "correct", **kw: object) -> SpaprIommu:
    spec = WindowSpec(LIOBN, 0, 64 << 20, 12)
    return SpaprIommu(ByteMemory(RAM), [spec], mode=mode, hw_page_shift=12, **kw)  # type: ignore[arg-type]


def test_every_mode_builds_and_unknown_mode_is_refused() -> None:
    for mode in MODES:
        build(mode).check_invariants()
    with pytest.raises(ConfigError):
        build("sloppy")


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, (RAM >> 12) - 1).map(lambda p: (p << 12) | 3),
            st.integers(0, (RAM >> 12) - 1).map(lambda p: (p << 12) | 1),
            st.just(0),
            st.just(0xDEAD0000),
        ),
        min_size=1,
        max_size=64,
    ),
    st.integers(0, 4000),
)
def test_vectorised_equals_loop(values: list[int], first: int) -> None:
    states = []
    for vectorised in (True, False):
        io = build(groups=2, shared_tables=False)
        io.kvm.vectorised = vectorised
        io.memory.write(0x10000, encode_tce_list([(0x300000 + (i << 12)) | RW for i in range(64)]))
        io.hcall(Hcall.H_PUT_TCE_INDIRECT, LIOBN, first << 12, 0x10000, 64)
        io.memory.write(0x10000, encode_tce_list(values))
        ret = io.hcall(Hcall.H_PUT_TCE_INDIRECT, LIOBN, (first + 7) << 12, 0x10000, len(values))
        ret2 = io.hcall(Hcall.H_STUFF_TCE, LIOBN, (first + 3) << 12, 0, 20)
        io.check_invariants()
        states.append(
            (
                ret,
                ret2,
                [t.tces.tobytes() + t.ua_cache.tobytes() for t in io.hw_tables(LIOBN)],
                io.window(LIOBN).view.dense().tobytes(),
                [(r.mapped, r.dirty.tobytes()) for r in io.mm.regions],
            )
        )
    assert states[0] == states[1]


def test_guest_dma_layer_maps_and_devices_obey_permissions() -> None:
    io = SpaprIommu(ByteMemory(RAM), [WindowSpec(LIOBN, 0, 64 << 20, 12)], hw_page_shift=12)
    win = GuestDmaWindow(
        io.hcall, io.memory, liobn=LIOBN, offset=0, size=64 << 20, page_shift=12, list_page=0x1000
    )
    rx = win.map(0x20000 + 0x123, 3 * 65536, DmaDirection.FROM_DEVICE)  # 64 KiB guest pages
    tx = win.map(0x80000, 4096, DmaDirection.TO_DEVICE)
    io.memory.write(0x80000, b"packet")
    assert io.dma_read(LIOBN, tx.ioba, 6) == b"packet"
    io.dma_write(LIOBN, rx.ioba + 70000, b"payload")
    assert io.memory.read(0x20123 + 70000, 7) == b"payload"
    with pytest.raises(DmaFault):
        io.dma_write(LIOBN, tx.ioba, b"x")  # read-only for the device
    assert io.dma_read(LIOBN, rx.ioba + 70000, 7) == b"payload"  # hardware: W implies R
    io.check_invariants()
    win.unmap(rx)
    with pytest.raises(DmaFault):
        io.dma_write(LIOBN, rx.ioba, b"late")
    assert io.memory.read(0x20123, 4) == bytes(4)
    assert len(io.dma_faults) == 2
    with pytest.raises(GuestDmaError):
        win.unmap(rx)
    win.unmap(tx)
    io.check_invariants()
    assert io.mm.regions[0].mapped == 1


def test_guest_dma_without_multi_tce_uses_put_tce() -> None:
    io = SpaprIommu(ByteMemory(RAM), [WindowSpec(LIOBN, 0, 64 << 20, 16)], hw_page_shift=16)
    win = GuestDmaWindow(
        io.hcall,
        io.memory,
        liobn=LIOBN,
        offset=0,
        size=64 << 20,
        page_shift=16,
        list_page=0x1000,
        multi_tce=False,
    )
    m = win.map(0x100000, 5 << 16, DmaDirection.BIDIRECTIONAL)
    assert int(np.count_nonzero(io.hw_tables(LIOBN)[0].tces)) == 5
    win.unmap(m)
    assert not io.hw_tables(LIOBN)[0].tces.any()


def test_window_from_definition() -> None:
    spec = WindowSpec.from_definition(
        {"liobn": 0x80000000, "offset": 0, "size_mib": 1024, "page_shift": 16}
    )
    assert spec.entries == (1 << 30) >> 16
    bad = [
        {"liobn": 1, "size_mib": 1},
        {"liobn": 1, "size_mib": 1, "page_shift": 13},
        {"liobn": 1 << 32, "size_mib": 1, "page_shift": 12},
        {"liobn": 1, "size_mib": 0, "page_shift": 12},
        {"liobn": 1, "size_mib": "1", "page_shift": 12},
        {"liobn": 1, "size_mib": 1, "page_shift": 12, "colour": "red"},
        {"liobn": 1, "offset": 0x1000, "size_mib": 1, "page_shift": 16},
    ]
    for d in bad:
        with pytest.raises(ConfigError):
            WindowSpec.from_definition(d)


def test_unknown_opcode_and_short_args() -> None:
    io = build()
    assert io.hcall(0x999).ret == HRet.H_FUNCTION
    assert io.hcall(Hcall.H_GET_TCE, LIOBN).ret == HRet.H_SUCCESS  # missing regs read as 0


def test_windows_from_definition_checks_the_list() -> None:
    from vmferry.hw.spapr import windows_from_definition

    good = {"tce_windows": [{"liobn": 1, "size_mib": 16, "page_shift": 12}]}
    assert [w.liobn for w in windows_from_definition(good)] == [1]
    assert windows_from_definition({}) == []
    w = {"liobn": 1, "size_mib": 16, "page_shift": 12}
    for bad in (
        {"tce_windows": {}},
        {"tce_windows": [w, w]},
        {"tce_windows": [w, {**w, "liobn": 2}]},
    ):
        with pytest.raises(ConfigError):
            windows_from_definition(bad)


def test_component_round_trip_rebuilds_on_other_host() -> None:
    from vmferry.hw.spapr.component import SpaprTceComponent
    from vmferry.hw.spapr.hostmem import HostMemoryMap

    src = build()
    win = GuestDmaWindow(
        src.hcall,
        src.memory,
        liobn=LIOBN,
        offset=0,
        size=64 << 20,
        page_shift=12,
        list_page=0x1000,
    )
    m = win.map(0x40000, 8192, DmaDirection.BIDIRECTIONAL)
    data = SpaprTceComponent(src).save_state()
    other = HostMemoryMap.for_ram(RAM, ua_base=0x6000_0000_0000, hpa_base=0x4000_0000_0000)
    dst = SpaprIommu(
        ByteMemory(RAM), [WindowSpec(LIOBN, 0, 64 << 20, 12)], hw_page_shift=12, host=other
    )
    comp = SpaprTceComponent(dst)
    comp.load_state(data)
    assert comp.last_report is not None and comp.last_report.mapped == 2
    dst.check_invariants()
    dst.dma_write(LIOBN, m.ioba + 4096, b"after migration")
    assert dst.memory.read(0x40000 + 4096, 15) == b"after migration"


def test_dma_writable_ranges_lists_device_writable_pages() -> None:
    io = build()
    io.hcall(Hcall.H_PUT_TCE, LIOBN, 0x1000, 0x30000 | 2)
    io.hcall(Hcall.H_PUT_TCE, LIOBN, 0x2000, 0x40000 | 1)  # device may only read
    io.hcall(Hcall.H_PUT_TCE, LIOBN, 0x3000, 0x30000 | 3)
    assert io.dma_writable_ranges() == [(0x30000, 4096)]
