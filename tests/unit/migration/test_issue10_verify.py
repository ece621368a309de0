"""Issue 10, item 2: verification guards the point of no return (sans-IO exchange)."""

from __future__ import annotations

from typing import Any

import pytest

from vmferry.clock import ManualClock
from vmferry.errors import MigrationError
from vmferry.machine import create_vm
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import migrate_locally
from vmferry.migration.source import MigrationParams, SourceSession


class TamperingDestination(DestinationSession):
    """Loads a page the source never sent that way (a lost dirty page, in effect)."""

    def finish(self, *, start: bool = True) -> dict[str, Any]:
        assert self.vm is not None
        self.vm.ram.device_write(0, b"\xff" * 64)
        return super().finish(start=start)


def _vm() -> Any:
    vm = create_vm({"name": "v", "memory_mib": 4, "vcpus": 1, "fill": "random"})
    vm.start()
    return vm


def test_issue10_2_verification_mismatch_fails_before_commit() -> None:
    vm = _vm()
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(verify=True), clock)
    dst = TamperingDestination(clock, verify=True)
    with pytest.raises(MigrationError) as err:
        migrate_locally(src, dst, clock)
    assert err.value.step == "verification" and "ram" in err.value.reason
    assert src.status is Status.FAILED and vm.running  # the source resumed
    assert dst.vm is None  # the destination discarded its copy, never ran it


def test_verification_report_before_commit() -> None:
    vm = _vm()
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(verify=True), clock)
    dst = DestinationSession(clock, verify=True)
    ack = migrate_locally(src, dst, clock)
    report = src.verification(ack)
    assert report["verified"] and report["differ"] == []
    assert src.status is Status.COMPLETED and dst.vm is not None and dst.vm.running


def test_no_digests_is_not_verified() -> None:
    vm = _vm()
    src = SourceSession(vm, MigrationParams(verify=True), ManualClock())
    report = src.verification({})
    assert not report["verified"] and "ram" in report["differ"]
    assert SourceSession(vm, MigrationParams(), ManualClock()).verification({}) == {
        "requested": False
    }



def test_issue10_2_verification_pause_is_counted_as_downtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guest stays paused while the digests are compared: the job's downtime must
    include that time, not hide it in a separate figure."""
    import vmferry.migration.destination as destination

    vm = _vm()
    clock = ManualClock()
    real = destination.state_digests

    def slow_digests(v: Any) -> Any:  # the destination's digest takes 250 ms
        clock.advance(0.25)
        return real(v)

    monkeypatch.setattr(destination, "state_digests", slow_digests)
    src = SourceSession(vm, MigrationParams(verify=True), clock)
    migrate_locally(src, DestinationSession(clock, verify=True), clock)
    d = src.stats.downtime
    assert d.verification_ms == pytest.approx(250.0)
    assert d.total_ms >= 250.0
    parts = d.final_ram_ms + d.state_ms + d.after_stream_ms + d.verification_ms
    assert parts == pytest.approx(d.total_ms)
    assert src.stats.total_time_ms >= d.total_ms
