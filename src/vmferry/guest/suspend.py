"""The pseries guest kernel's side of partition migration: join, suspend, VASI, VAS.

Theory of operation
-------------------
:func:`migrate_partition` is the newest ``pseries_migrate_partition`` sequence:

1. VAS suspend: close every user VAS (NX-GZIP) window and block new opens (-EBUSY),
   waiting for opens already in progress so none escapes the close;
2. wait for the VASI stream: poll H_VASI_STATE every second while ENABLED until
   SUSPENDING (H_FUNCTION: the hypervisor does not implement it, proceed; H_PARAMETER:
   -EINVAL; any other state: -EIO) -- on error skip to 5;
3. suspend: up to five attempts of ``stop_machine(do_join)`` over every online CPU; after
   a failed attempt, retry only while VASI still says SUSPENDING (or cannot tell), sleeping
   1, 10, 100, 1000 ms between attempts; after the last failure signal CANCEL with reason
   ``(6 << 24) | (abs(errno) & 0xffffff)`` (aborting entity 6: the migrating partition);
4. on success: the post-migration fixup (device-tree update, a callback here), then wait
   for the VASI session to complete (poll every 500 ms while RESUMED; H_PARAMETER means it
   was already cleaned up);
5. VAS resume -- always, on success and on every error path.

:func:`do_join` runs on every CPU at once (:func:`stop_machine`, a seeded concurrent run;
the explorer can enumerate its interleavings): the CPU that gets H_CONTINUE calls
``ibm,suspend-me``; a CPU woken with H_SUCCESS before ``done`` was prodded by something
else and joins again; then every CPU increments ``counter`` and the one that moved it to
1 sets ``done`` and prods all the others.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from vmferry.clock import ManualClock
from vmferry.errors import Deadlock, InvariantViolation
from vmferry.hw.spapr.suspend import (
    H_CONTINUE,
    H_FUNCTION,
    H_PARAMETER,
    H_SUCCESS,
    SUSPEND_CANCELLED,
    SUSPEND_MULTIPLE_THREADS,
    SUSPEND_NOT_SUSPENDABLE,
    SUSPEND_OK,
    SUSPEND_OUTSTANDING_COP_OPS,
    PartitionHypervisor,
    VasiSignal,
    VasiState,
)
from vmferry.sched import hazard, run_random
from vmferry.sync import wait_until, yield_point

MAX_SUSPEND_ATTEMPTS = 5
RETRY_SLEEPS_MS = (1, 10, 100, 1000)
VASI_SUSPEND_POLL_S = 1.0
VASI_COMPLETE_POLL_S = 0.5
CANCEL_ENTITY = 6  # "migrating partition"


def suspend_me_errno(status: int) -> int:
    """The kernel's errno for an ``ibm,suspend-me`` status (0 on success)."""
    return {
        SUSPEND_OK: 0,
        SUSPEND_CANCELLED: -errno.ECANCELED,
        SUSPEND_MULTIPLE_THREADS: -errno.EAGAIN,
        SUSPEND_NOT_SUSPENDABLE: -errno.EBUSY,
        SUSPEND_OUTSTANDING_COP_OPS: -errno.EBUSY,
    }.get(status, -errno.EIO)


def cancel_reason(err: int) -> int:
    return (CANCEL_ENTITY << 24) | (abs(err) & 0xFFFFFF)


# --- join ------------------------------------------------------------------------------------


@dataclass(eq=False)  # identity: shared state the explorer tracks
class JoinState:
    """Shared by every CPU in one suspend attempt."""

    counter: int = 0
    done: bool = False
    rejoins: int = 0
    prodder: int | None = None


def do_join(cpu: int, hv: PartitionHypervisor, shared: JoinState, stream: int,
            irqs_enabled: bool = False) -> int:
    """One CPU's part of a suspend attempt; 0 or a negative errno."""
    while True:
        rc = hv.h_join(cpu, irqs_enabled)
        if rc == H_CONTINUE:
            result = suspend_me_errno(hv.ibm_suspend_me(cpu, stream))
            break
        if rc == H_SUCCESS:
            yield_point("read done", shared, write=False)
            if not shared.done:  # a stray prod: go back to sleep
                shared.rejoins += 1
                continue
            result = 0
            break
        result = -errno.EIO  # H_BAD_MODE, H_HARDWARE, anything else
        break
    yield_point("counter++", shared, write=True)
    shared.counter += 1
    if shared.counter == 1:
        shared.done = True
        shared.prodder = cpu
        for other in range(hv.ncpus):
            if other != cpu:
                hv.h_prod(other)
    return result


def stop_machine(hv: PartitionHypervisor, stream: int, *, seed: int = 0,
                 irqs_enabled: frozenset[int] = frozenset()) -> tuple[int, JoinState]:
    """Run :func:`do_join` on every CPU concurrently; the first non-zero result or 0."""
    shared = JoinState()
    threads = {f"cpu{c}": _joiner(c, hv, shared, stream, c in irqs_enabled)
               for c in range(hv.ncpus)}
    runner = run_random(threads, seed)
    found = hazard(runner)
    if found is not None:
        raise InvariantViolation(f"suspend attempt: {found}")
    if runner.stuck():
        raise Deadlock(f"suspend attempt: CPUs never woke: {runner.stuck()}")
    results = [int(runner.threads[f"cpu{c}"].result) for c in range(hv.ncpus)]
    return next((r for r in results if r), 0), shared


def _joiner(cpu: int, hv: PartitionHypervisor, shared: JoinState, stream: int,
            irqs: bool) -> Callable[[], int]:
    return lambda: do_join(cpu, hv, shared, stream, irqs)


# --- VAS --------------------------------------------------------------------------------------


@dataclass(eq=False)  # identity: shared state the explorer tracks
class VasWindows:
    """User-space VAS (NX-GZIP) windows and the migration's hold on them.

    ``block_open=False`` is the old kernel: opens are not blocked during migration and an
    open in progress when SUSPEND starts can escape the close.
    Invariant (correct mode): from the moment suspend() returns until resume(), no window
    is open (``holding`` marks that interval).
    """

    block_open: bool = True
    windows: set[int] = field(default_factory=set)
    suspended: set[int] = field(default_factory=set)  # closed by suspend, to reopen
    migration_in_progress: bool = False
    holding: bool = False
    opening: int = 0
    _next: int = 1

    def open_window(self) -> int:
        """A new window's id, or -EBUSY while a migration holds VAS.

        The open counts itself in progress *before* it looks at the migration flag, so a
        suspend either sees it and waits for it, or it sees the flag and gives up."""
        if self.block_open:
            self.opening += 1
        yield_point("vas open: check", self, write=True)
        if self.block_open and self.migration_in_progress:
            self.opening -= 1
            return -errno.EBUSY
        yield_point("vas open: allocate", self, write=True)
        wid = self._next
        self._next += 1
        self.windows.add(wid)
        if self.block_open:
            self.opening -= 1
        return wid

    def suspend(self) -> None:
        yield_point("vas suspend", self, write=True)
        self.migration_in_progress = True
        if self.block_open:
            wait_until("vas opens in progress", lambda: self.opening == 0)
        self.suspended |= self.windows
        self.windows.clear()
        self.holding = True

    def resume(self) -> None:
        yield_point("vas resume", self, write=True)
        self.windows |= self.suspended
        self.suspended.clear()
        self.holding = False
        self.migration_in_progress = False

    def check(self) -> None:
        if self.holding and self.windows:
            raise InvariantViolation(f"VAS windows {sorted(self.windows)} open during "
                                     "migration")


# --- the sequence ------------------------------------------------------------------------------


@dataclass
class MigrationTrace:
    result: int = 0
    attempts: int = 0
    sleeps_ms: list[int] = field(default_factory=list)
    vasi_waits: int = 0
    completion_polls: int = 0
    fixup_ran: bool = False
    vas_resumed: bool = False
    events: list[str] = field(default_factory=list)


def wait_for_vasi_suspending(hv: PartitionHypervisor, stream: int, clock: ManualClock,
                             trace: MigrationTrace) -> int:
    while True:
        rc, state = hv.h_vasi_state(stream)
        if rc == H_FUNCTION:
            trace.events.append("H_VASI_STATE not implemented: proceed")
            return 0
        if rc == H_PARAMETER:
            return -errno.EINVAL
        if rc != H_SUCCESS:
            return -errno.EIO
        if state == VasiState.SUSPENDING:
            return 0
        if state != VasiState.ENABLED:
            return -errno.EIO
        trace.vasi_waits += 1
        clock.advance(VASI_SUSPEND_POLL_S)


def pseries_suspend(hv: PartitionHypervisor, stream: int, clock: ManualClock,
                    trace: MigrationTrace, *, seed: int = 0) -> int:
    err = 0
    for attempt in range(MAX_SUSPEND_ATTEMPTS):
        trace.attempts += 1
        err, _ = stop_machine(hv, stream, seed=seed + attempt)
        if err == 0:
            return 0
        trace.events.append(f"suspend attempt {attempt + 1}: {err}")
        if attempt == MAX_SUSPEND_ATTEMPTS - 1:
            break
        rc, state = hv.h_vasi_state(stream)
        if rc == H_SUCCESS and state != VasiState.SUSPENDING:
            trace.events.append(f"VASI left SUSPENDING ({state.name}): no more attempts")
            break
        trace.sleeps_ms.append(RETRY_SLEEPS_MS[attempt])
        clock.advance(RETRY_SLEEPS_MS[attempt] / 1e3)
    hv.h_vasi_signal(stream, VasiSignal.CANCEL, cancel_reason(err))
    return err


def wait_for_vasi_completed(hv: PartitionHypervisor, stream: int, clock: ManualClock,
                            trace: MigrationTrace) -> None:
    while True:
        rc, state = hv.h_vasi_state(stream)
        if rc == H_PARAMETER or (rc == H_SUCCESS and state == VasiState.COMPLETED):
            return
        if rc != H_SUCCESS or state != VasiState.RESUMED:
            trace.events.append(f"VASI session ended in {state.name} (rc {rc})")
            return
        trace.completion_polls += 1
        clock.advance(VASI_COMPLETE_POLL_S)


def migrate_partition(hv: PartitionHypervisor, stream: int, clock: ManualClock, *,
                      vas: VasWindows | None = None,
                      fixup: Callable[[], object] | None = None, seed: int = 0,
                      ) -> MigrationTrace:
    """The guest's whole suspend/resume sequence (see the module docstring)."""
    trace = MigrationTrace()
    vas = vas if vas is not None else VasWindows()
    vas.suspend()
    try:
        trace.result = wait_for_vasi_suspending(hv, stream, clock, trace)
        if trace.result == 0:
            trace.result = pseries_suspend(hv, stream, clock, trace, seed=seed)
        if trace.result == 0:
            if fixup is not None:
                fixup()
            trace.fixup_ran = True
            wait_for_vasi_completed(hv, stream, clock, trace)
    finally:
        vas.resume()
        trace.vas_resumed = True
    return trace
