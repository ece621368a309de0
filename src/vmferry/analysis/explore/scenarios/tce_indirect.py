"""``tce-indirect``: H_PUT_TCE_INDIRECT while another guest thread rewrites the TCE list.

A vCPU maps two entries with H_PUT_TCE_INDIRECT from a list page in guest RAM; another
guest thread (a second vCPU, or a device DMA-ing into the page) stores a new value into
one list slot.  The seed thread's v4 patch validated every entry and then read the list
again to apply it, so the value applied can differ from the value validated
(docs/models/spapr-tce.md §10).

Cases (the writer's new value for list slot 1):

* ``t1-valid``     valid A -> valid B in preregistered RAM: B reaches the hardware table
  without ever being validated (``UnvalidatedTce``).
* ``t6-poison``    poison (no permission, never checked) -> valid B: same.  (The poison value points
  into RAM: K-now translates even poison values on the re-read pass.)
* ``t4-zero``      valid A -> 0: a value never validated is applied (and with the
  zero-entry quirk the 0 goes through the map path: a mapped-count leak).
* ``t5-misaligned`` (64 KiB IOMMU pages) valid A -> A + 0x1000: with the missing alignment
  re-check the misaligned HPA reaches the hardware exchange: host BUG (``HostCrash``).

The ``kernel`` mode is the kernel's own handler (validate, then re-read): every case fails
in it.  The ``correct`` mode is vmferry's stricter variant (no kernel has it): it copies the
list once into the vCPU's buffer, so whichever instant the copy happens, the applied list is
one that existed, every applied value was validated, and the INV rules hold; no schedule
fails.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from vmferry.analysis.explore.api import Case, Instance, Scenario
from vmferry.analysis.explore.fingerprint import fingerprint
from vmferry.hw.spapr.hcall import Hcall, HcallResult, HRet
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec
from vmferry.hw.spapr.tce import MODE_HELP, TCE_PCI_READ, TCE_PCI_WRITE, encode_tce_list
from vmferry.machine.ram import GuestRam
from vmferry.sync import yield_point

LIOBN = 0x80000000
LIST = 0x10000
BUF = 0x100000
RW = TCE_PCI_READ | TCE_PCI_WRITE
MODES = ("correct", "kernel", "double_read", "no_align_recheck", "zero_entry_leak", "upstream")
READS_TWICE = frozenset({"kernel", "double_read", "no_align_recheck", "upstream"})
#: a no-permission value in the applied list leaks a mapped count when it is mapped (T4)
LEAKY = READS_TWICE | {"zero_entry_leak"}


@dataclass
class _World:
    iommu: SpaprIommu
    results: list[HcallResult] = field(default_factory=list)


def _builder(first: list[int], new: int, page_shift: int) -> Callable[[str], Instance]:
    def build(mode: str) -> Instance:
        memory = GuestRam(4 << 20)
        window = WindowSpec(LIOBN, 0, 16 << 20, page_shift)
        iommu = SpaprIommu(memory, [window], mode=mode, hw_page_shift=page_shift)
        memory.write(LIST, encode_tce_list(first))
        world = _World(iommu)

        def vcpu() -> None:
            world.results.append(
                iommu.hcall(Hcall.H_PUT_TCE_INDIRECT, LIOBN, 0, LIST, len(first), vcpu=0)
            )

        def writer() -> None:
            yield_point("guest writes L[1]", ("guest-ram", LIST >> 12), write=True)
            memory.write(LIST + 8, encode_tce_list([new]))

        def invariant() -> None:
            if iommu.hazards:
                raise iommu.hazards[0]

        def check() -> None:
            assert [r.ret for r in world.results] == [HRet.H_SUCCESS], world.results
            iommu.check_invariants()

        def state() -> Hashable:
            return (memory.read(LIST, 8 * len(first)),
                    fingerprint(iommu, world.results, skip=(memory,)))

        return Instance({"vcpu0": vcpu, "guest1": writer}, invariant, check, state=state)

    return build


def _case(
    name: str, description: str, first: list[int], new: int, shift: int, fails: frozenset[str]
) -> Case:
    return Case(name, description, _builder(first, new, shift), fails)


A0, A1, B = BUF | RW, (BUF + 0x10000) | RW, (BUF + 0x80000) | RW

SCENARIO = Scenario(
    name="tce-indirect",
    description="H_PUT_TCE_INDIRECT racing with a guest thread rewriting the TCE list",
    modes=MODES,
    default_mode="correct",
    cases=(
        _case("t1-valid", "slot 1: valid A -> valid B", [A0, A1], B, 12, READS_TWICE),
        _case("t6-poison", "slot 1: poison -> valid B", [A0, BUF + 0x20000], B, 12, LEAKY),
        _case("t4-zero", "slot 1: valid A -> 0", [A0, A1], 0, 12, LEAKY),
        _case(
            "t5-misaligned",
            "slot 1: valid A -> A + 0x1000 with 64 KiB IOMMU pages",
            [A0, A1],
            A1 + 0x1000,
            16,
            frozenset({"kernel", "no_align_recheck", "upstream"}),
        ),
    ),
    mode_help={m: MODE_HELP[m] for m in MODES},
    preemption_bound=None,
)
