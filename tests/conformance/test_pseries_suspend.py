"""pseries-mobility conformance checks 39-45: join, suspend-me, VASI and VAS."""

from __future__ import annotations

import errno

import pytest

from vmferry.analysis.explore import Instance, explore
from vmferry.clock import ManualClock
from vmferry.errors import InvariantViolation
from vmferry.guest.suspend import (
    JoinState,
    VasWindows,
    cancel_reason,
    do_join,
    migrate_partition,
    stop_machine,
    suspend_me_errno,
)
from vmferry.hw.spapr.suspend import (
    H_FUNCTION,
    H_PARAMETER,
    H_SUCCESS,
    SUSPEND_MULTIPLE_THREADS,
    PartitionHypervisor,
    VasiSignal,
    VasiState,
)

S = VasiState


def join_instance(stray: bool) -> Instance:
    hv = PartitionHypervisor(4)
    shared = JoinState()
    results: dict[int, int] = {}

    def cpu(c: int) -> None:
        results[c] = do_join(c, hv, shared, stream=7)

    threads = {f"cpu{c}": (lambda c=c: cpu(c)) for c in range(4)}
    if stray:
        threads["kick"] = lambda: hv.stray_prod(2)

    def check() -> None:
        assert sorted(results) == [0, 1, 2, 3] and set(results.values()) == {0}
        assert len(hv.suspend_calls) == 1, hv.suspend_calls
        assert shared.counter == 4 and shared.done and shared.prodder is not None

    return Instance(threads=threads, check=check)


@pytest.mark.parametrize("stray", [False, True])
def test_check_39_do_join_one_suspender_all_return_zero(stray: bool) -> None:
    report = explore(lambda: join_instance(stray), preemption_bound=1, max_steps=2000)
    assert report.failures == [] and report.schedules_explored > 1


def test_check_39_the_first_to_count_prods_the_others_and_strays_rejoin() -> None:
    for seed in range(40):
        hv = PartitionHypervisor(4)
        hv.prodded.add(1)  # a kick that arrives before the join: cpu1 wakes too early
        result, shared = stop_machine(hv, 7, seed=seed)
        assert result == 0 and len(hv.suspend_calls) == 1
        suspender = hv.suspend_calls[0][0]
        assert shared.prodder == suspender and shared.counter == 4
        if suspender != 1:
            assert shared.rejoins >= 1


def test_check_40_join_with_interrupts_enabled_fails_the_attempt() -> None:
    for seed in range(20):
        hv = PartitionHypervisor(4)
        result, _ = stop_machine(hv, 7, seed=seed, irqs_enabled=frozenset({2}))
        assert result == -errno.EIO and hv.suspend_calls == []


@pytest.mark.parametrize(("status", "err"), [
    (0, 0), (9000, -errno.ECANCELED), (-9005, -errno.EAGAIN), (-9004, -errno.EBUSY),
    (-9006, -errno.EBUSY), (-1, -errno.EIO), (17, -errno.EIO),
])
def test_check_41_suspend_me_status_mapping(status: int, err: int) -> None:
    assert suspend_me_errno(status) == err


def test_check_42_five_failures_then_cancel() -> None:
    hv = PartitionHypervisor(2, suspend_statuses=(SUSPEND_MULTIPLE_THREADS,),
                             vasi_script=((H_SUCCESS, S.SUSPENDING),))
    clock = ManualClock()
    trace = migrate_partition(hv, 5, clock)
    assert trace.result == -errno.EAGAIN and trace.attempts == 5
    assert trace.sleeps_ms == [1, 10, 100, 1000]
    assert hv.signals == [(5, VasiSignal.CANCEL, 0x06000000 | errno.EAGAIN)]
    assert cancel_reason(-errno.EAGAIN) == 0x06000000 | errno.EAGAIN
    assert trace.vas_resumed and not trace.fixup_ran


def test_check_42_vasi_leaving_suspending_stops_the_retries() -> None:
    script = ((H_SUCCESS, S.SUSPENDING), (H_SUCCESS, S.SUSPENDING), (H_SUCCESS, S.ABORTED))
    hv = PartitionHypervisor(2, suspend_statuses=(SUSPEND_MULTIPLE_THREADS,),
                             vasi_script=script)
    trace = migrate_partition(hv, 5, ManualClock())
    assert trace.attempts == 2 and trace.sleeps_ms == [1]
    assert len(hv.signals) == 1 and hv.signals[0][1] == VasiSignal.CANCEL


def test_check_43_vasi_not_implemented_means_ready() -> None:
    hv = PartitionHypervisor(2, vasi_script=((H_FUNCTION, S.INVALID),))
    trace = migrate_partition(hv, 5, ManualClock())
    assert trace.result == 0 and len(hv.suspend_calls) == 1


def test_check_43_vasi_parameter_error_means_no_suspend() -> None:
    vas = VasWindows()
    vas.open_window()
    hv = PartitionHypervisor(2, vasi_script=((H_PARAMETER, S.INVALID),))
    trace = migrate_partition(hv, 5, ManualClock(), vas=vas)
    assert trace.result == -errno.EINVAL and hv.suspend_calls == [] and trace.attempts == 0
    assert trace.vas_resumed and vas.windows and not vas.migration_in_progress


def test_check_43_waits_while_enabled() -> None:
    script = ((H_SUCCESS, S.ENABLED), (H_SUCCESS, S.ENABLED), (H_SUCCESS, S.SUSPENDING),
              (H_SUCCESS, S.COMPLETED))
    clock = ManualClock()
    trace = migrate_partition(PartitionHypervisor(2, vasi_script=script), 5, clock)
    assert trace.result == 0 and trace.vasi_waits == 2 and clock.monotonic() >= 2.0


def test_check_44_returns_only_after_completed() -> None:
    order: list[str] = []
    script = ((H_SUCCESS, S.SUSPENDING), (H_SUCCESS, S.RESUMED), (H_SUCCESS, S.RESUMED),
              (H_SUCCESS, S.COMPLETED))
    vas = VasWindows()
    hv = PartitionHypervisor(3, vasi_script=script)
    trace = migrate_partition(hv, 5, ManualClock(), vas=vas,
                              fixup=lambda: order.append("fixup"))
    assert trace.result == 0 and order == ["fixup"] and trace.completion_polls == 2
    assert trace.vas_resumed and not vas.migration_in_progress


def test_check_44_cleaned_up_session_counts_as_completed() -> None:
    script = ((H_SUCCESS, S.SUSPENDING), (H_PARAMETER, S.INVALID))
    trace = migrate_partition(PartitionHypervisor(2, vasi_script=script), 5, ManualClock())
    assert trace.result == 0 and trace.completion_polls == 0


def vas_race(block_open: bool) -> Instance:
    vas = VasWindows(block_open=block_open)
    opened: list[int] = []

    def migration() -> None:
        vas.suspend()
        vas.check()  # what suspend must guarantee before the partition suspends
        vas.resume()

    return Instance(threads={"migrate": migration,
                             "user": lambda: opened.append(vas.open_window())},
                    invariant=vas.check, check=vas.check)


def test_check_45_opens_during_migration_get_ebusy() -> None:
    vas = VasWindows()
    vas.suspend()
    assert vas.open_window() == -errno.EBUSY
    vas.resume()
    assert vas.open_window() > 0


def test_check_45_a_window_mid_open_is_closed_before_suspend() -> None:
    assert explore(lambda: vas_race(True), preemption_bound=3).failures == []
    faulty = explore(lambda: vas_race(False), preemption_bound=3)
    assert faulty.failures and faulty.failures[0].hazard == InvariantViolation.hazard
