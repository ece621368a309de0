"""Issue 17 item 4: the downtime after the stream, in the parts it is made of (the
destination's receive backlog, its load, the round trips, its adopt), as measured."""

from __future__ import annotations

import pytest

from vmferry.clock import ManualClock
from vmferry.machine import create_vm
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import migrate_locally, transfer
from vmferry.migration.source import MigrationParams, SourceSession


def test_issue17_item4_after_stream_is_split_into_what_was_measured() -> None:
    vm = create_vm({"name": "d", "memory_mib": 4, "vcpus": 1, "fill": "random"})
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(), clock)
    transfer(src, DestinationSession(clock), clock)  # END sent
    clock.advance(0.050)  # the destination drains its backlog and loads (30 ms of it)
    src.loaded()  # LOADED arrives
    clock.advance(0.012)  # COMMIT, the destination's adopt (5 ms), RESUMED
    stats = src.complete({"load_ms": 30.0, "channels_wait_ms": 10.0, "adopt_ms": 5.0,
                          "verification_ms": 0.0})  # fmt: skip
    d = stats.downtime
    assert d.after_stream_ms == pytest.approx(62.0)
    # the channels' wait counts as backlog, not as the load it was measured inside
    assert (d.drain_ms, d.load_ms) == (pytest.approx(30.0), pytest.approx(20.0))
    assert (d.round_trips_ms, d.adopt_ms) == (pytest.approx(7.0), pytest.approx(5.0))
    assert d.drain_ms + d.load_ms + d.round_trips_ms + d.adopt_ms == pytest.approx(
        d.after_stream_ms)
    assert d.final_ram_ms + d.state_ms + d.after_stream_ms == pytest.approx(d.total_ms)
    assert "resume_ms" not in stats.to_json()["downtime-breakdown"]


def test_issue17_item4_local_migration_parts_add_up() -> None:
    vm = create_vm({"name": "d", "memory_mib": 4, "vcpus": 1, "fill": "random",
                    "workload": {"dirty_rate_mbps": 20}})
    vm.start()
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(verify=True), clock)
    migrate_locally(src, DestinationSession(clock, verify=True), clock, on_time=vm.run_slice)
    d = src.stats.downtime
    parts = d.drain_ms + d.load_ms + d.round_trips_ms + d.adopt_ms
    assert parts == pytest.approx(d.after_stream_ms)
    assert d.final_ram_ms + d.state_ms + d.after_stream_ms + d.verification_ms == \
        pytest.approx(d.total_ms)  # fmt: skip
