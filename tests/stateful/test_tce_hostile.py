"""A hostile guest: random TCE hypercalls, arguments and list contents.

Whatever the guest does, in the correct mode the platform answers with a return code
(never H_TOO_HARD, never an exception), no hardware table diverges from the guest view,
no pin or mapped count leaks, and device DMA never reaches memory the guest did not map.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vmferry.hw.spapr.hcall import Hcall, HRet
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec
from vmferry.hw.spapr.tce import DmaFault, encode_tce_list
from vmferry.testing.memory import ByteMemory

RAM = 8 << 20
WINDOWS = [
    WindowSpec(0x80000000, 0, 4 << 20, 12),
    WindowSpec(0x80000001, 1 << 32, 16 << 20, 16),
    WindowSpec(0x1000, 0, 1 << 20, 12, in_kernel=False),
]
LIOBNS = [w.liobn for w in WINDOWS] + [0x1234, 1 << 32]
ALLOWED = {HRet.H_SUCCESS, HRet.H_PARAMETER, HRet.H_FUNCTION}
U64 = (1 << 64) - 1

gpa_page = st.integers(0, (RAM >> 12) - 1).map(lambda p: p << 12)
tce = st.one_of(
    st.tuples(gpa_page, st.integers(0, 3)).map(lambda t: t[0] | t[1]),
    st.tuples(st.integers(0, RAM), st.integers(0, 3)).map(lambda t: t[0] | t[1]),
    st.integers(0, U64),
    st.sampled_from([0, 0xDEAD0000, (1 << 40) | 3, U64]),
)
ioba = st.one_of(
    st.integers(0, 1200).map(lambda i: i << 12),
    st.integers(0, 200).map(lambda i: i << 12),
    st.integers(0, 300).map(lambda i: (1 << 32) + (i << 16)),
    st.integers(0, U64),
)
count = st.one_of(
    st.integers(0, 30), st.integers(0, 30), st.integers(0, 600), st.sampled_from([U64, 1 << 63])
)
list_addr = st.one_of(
    st.just(0x10000),
    st.just(0x10000),
    st.sampled_from([0x7FF000, 0x10008, RAM, 1 << 40]),
    st.integers(0, U64),
)
liobn = st.one_of(st.sampled_from(LIOBNS[:3]), st.sampled_from(LIOBNS))

op = st.one_of(
    st.tuples(st.just(Hcall.H_PUT_TCE), liobn, ioba, tce),
    st.tuples(st.just(Hcall.H_GET_TCE), liobn, ioba),
    st.tuples(st.just(Hcall.H_STUFF_TCE), liobn, ioba, tce, count),
    st.tuples(
        st.just(Hcall.H_PUT_TCE_INDIRECT),
        liobn,
        ioba,
        list_addr,
        count,
        st.lists(tce, min_size=1, max_size=24),
    ),
    st.tuples(st.just("fault"), st.integers(0, 1), st.integers(0, 2000)),
    st.tuples(st.just("dma"), st.sampled_from(LIOBNS[:3]), ioba, st.booleans()),
    st.tuples(st.just("bad-opcode"), st.integers(0, 0x500)),
)


def _apply(io: SpaprIommu, step: tuple[object, ...]) -> None:
    kind = step[0]
    if kind == "fault":
        tables = io.hw_tables(WINDOWS[0].liobn)
        tables[int(step[1]) % len(tables)].fail_xchg.add(int(step[2]))  # type: ignore[call-overload]
        return
    if kind == "dma":
        _, liobn, addr, write = step
        try:
            if write:
                io.dma_write(int(liobn), int(addr), b"\xab" * 16)  # type: ignore[call-overload]
            else:
                io.dma_read(int(liobn), int(addr), 16)  # type: ignore[call-overload]
        except DmaFault:
            pass
        return
    if kind == "bad-opcode":
        if step[1] not in set(Hcall):
            assert io.hcall(int(step[1])).ret == HRet.H_FUNCTION  # type: ignore[call-overload]
        return
    if kind == Hcall.H_PUT_TCE_INDIRECT:
        _, liobn, addr, lst, n, values = step
        if isinstance(lst, int) and lst + 8 * 24 <= RAM and values:
            io.memory.write(lst, encode_tce_list(values))  # type: ignore[arg-type]
        args = (liobn, addr, lst, n)
    else:
        args = step[1:]
    result = io.hcall(int(kind), *(int(a) for a in args))  # type: ignore[call-overload]
    event(f"{Hcall(int(kind)).name} -> {HRet(result.ret).name}")  # type: ignore[call-overload]
    assert result.ret in ALLOWED, (step, result)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    groups=st.integers(1, 2),
    shared=st.booleans(),
    steps=st.lists(op, min_size=1, max_size=14),
)
def test_hostile_guest_never_corrupts(
    groups: int, shared: bool, steps: list[tuple[object, ...]]
) -> None:
    io = SpaprIommu(
        ByteMemory(RAM),
        WINDOWS,
        groups=groups,
        shared_tables=shared,
        hw_page_shift=12,
        slot_sizes=[4 << 20, 4 << 20],
    )
    for step in steps:
        _apply(io, step)
        io.check_invariants()
    io.hcall(Hcall.H_STUFF_TCE, WINDOWS[0].liobn, 0, 0, WINDOWS[0].entries)
    io.hcall(Hcall.H_STUFF_TCE, WINDOWS[1].liobn, 1 << 32, 0, WINDOWS[1].entries)
    io.hcall(Hcall.H_STUFF_TCE, WINDOWS[2].liobn, 0, 0, WINDOWS[2].entries)
    io.check_invariants()
    assert all(r.mapped == 1 for r in io.mm.regions), "a pin/mapped count leaked"
    assert io.mm.pinned_pages == (RAM >> 16)
