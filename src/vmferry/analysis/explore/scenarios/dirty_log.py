"""``dirty-log``: a vCPU writing guest pages while the migration takes the dirty log.

Pre-copy is only correct if every page the guest changes after the sender read it is
marked dirty *and* that mark reaches a later pass.  The vCPU stores data, then marks the
page; the migration thread gets-and-clears the log and sends what it found.  KVM's
``KVM_GET_DIRTY_LOG`` exchanges each bitmap word atomically, so a mark lands in this log
or in the next one.  vmferry's first dirty log copied the bitmap and then cleared it,
without a lock: a mark that fell between the copy and the clear was in neither, its page
was never resent, and a completed migration ended with different RAM on the destination
(the lost dirty page of issue 10).

Each case starts from a destination that holds pass 1 (a copy of every page) with dirty
logging on.  Threads: ``vcpu0`` writes pages through :class:`~vmferry.machine.ram.GuestRam`
(data, then the mark); ``migration`` runs one pre-copy pass (get-and-clear, then send
the pages it lists).  The final check is the switchover: with the guest stopped, one more
get-and-clear and send; then every destination page must equal the source's, or the
hazard ``lost-dirty-page`` names the page whose mark was lost.

Modes: ``correct`` (get-and-clear swaps the bitmap under the log's lock, which every mark
takes) and ``copy_then_clear`` (the historical bug).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vmferry.analysis.explore.api import Case, Instance, Scenario
from vmferry.errors import HazardError
from vmferry.machine.ram import GuestRam
from vmferry.sync import ModelLock, yield_point

PAGE = 4096
NPAGES = 4
MODES = ("correct", "copy_then_clear")
_LOG_MODE = {"correct": "atomic", "copy_then_clear": "copy_then_clear"}


class LostDirtyPage(HazardError):
    """A page changed after it was sent and no later pass resent it."""

    hazard = "lost-dirty-page"


def _builder(writes: tuple[int, ...]) -> Callable[[str], Instance]:
    def build(mode: str) -> Instance:
        ram = GuestRam(NPAGES * PAGE, log_mode=_LOG_MODE[mode])
        ram.log_guard = ModelLock("dirty-log")
        for p in range(NPAGES):
            ram.write(p * PAGE, bytes([p + 1]) * 8)
        destination = ram.pages.copy()  # pass 1: every page
        ram.start_dirty_log()

        def send(pages: np.ndarray) -> None:
            for p in pages.tolist():
                yield_point("send page", ("guest-page", p), write=False)
                destination[p] = ram.pages[p]

        def vcpu() -> None:
            for k, p in enumerate(writes):
                yield_point("vcpu writes", ("guest-page", p))
                ram.write(p * PAGE, bytes([0x80 + k]) * 8)

        def migration() -> None:
            send(ram.get_dirty_log().pages())

        def check() -> None:  # switchover: the guest is stopped, the last pass goes out
            send(ram.get_dirty_log().pages())
            differ = np.flatnonzero((destination != ram.pages).any(axis=1)).tolist()
            if differ:
                raise LostDirtyPage(
                    f"page {differ[0]} changed after it was sent and was never resent: "
                    "its dirty mark fell between the log's copy and its clear"
                )

        return Instance({"vcpu0": vcpu, "migration": migration}, check=check)

    return build


SCENARIO = Scenario(
    name="dirty-log",
    description="a vCPU dirtying pages while the migration gets and clears the dirty log",
    modes=MODES,
    default_mode="correct",
    cases=(
        Case("one-write", "the vCPU writes page 1 once during a pass", _builder((1,)),
             frozenset({"copy_then_clear"})),
        Case("two-pages", "the vCPU writes pages 1 and 2 during a pass", _builder((1, 2)),
             frozenset({"copy_then_clear"})),
        Case("rewrite", "the vCPU writes page 1, then page 1 again", _builder((1, 1)),
             frozenset({"copy_then_clear"})),
    ),
    mode_help={
        "correct": "get-and-clear swaps the bitmap under the lock every mark takes (KVM)",
        "copy_then_clear": "the log is copied, then cleared, unlocked: a mark in between "
        "is lost",
    },
    preemption_bound=None,
)
