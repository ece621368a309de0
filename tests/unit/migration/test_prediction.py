"""Issue 17 item 4: the downtime predicted at the stop decision, and its error."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from vmferry.clock import ManualClock
from vmferry.machine import create_vm
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import migrate_locally
from vmferry.migration.prediction import SWITCHOVER_ROUND_TRIPS
from vmferry.migration.source import MEASURABLE_BYTES, MigrationParams, SourceSession


class Probe:
    def __init__(self, in_flight: int, rtt: float, bw: float = 0.0, fixed: float = 0.0
                 ) -> None:  # fmt: skip
        self.in_flight, self.rtt, self.bw, self.fixed = in_flight, rtt, bw, fixed
        self.settled = 0

    def fixed_switchover_s(self) -> float:
        return self.fixed

    def settle(self) -> None:
        self.settled += 1

    def in_flight_bytes(self) -> int:
        return self.in_flight

    def round_trip_s(self) -> float:
        return self.rtt

    def bandwidth_bps(self) -> float:
        return self.bw


def run(rate: float, probe: Probe | None, bandwidth: float = 60e6) -> SourceSession:
    vm = create_vm({"name": "p", "memory_mib": 32, "vcpus": 2, "fill": "random",
                    "workload": {"dirty_rate_mbps": rate, "pattern": "hot"}})
    vm.start()
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(downtime_limit_ms=50), clock, link=probe)
    dst = DestinationSession(clock)
    migrate_locally(src, dst, clock, link_bytes_per_s=bandwidth, on_time=vm.run_slice)
    return src


def test_issue17_item4_prediction_matches_simulated_downtime() -> None:
    src = run(30, None)
    st = src.stats
    assert st.status is Status.COMPLETED
    assert st.predicted["final_ram_ms"] > 0
    assert st.predicted_downtime_ms == sum(st.predicted.values())
    # on a simulated link the downtime is the final pass at the measured bandwidth
    err = (st.predicted_downtime_ms - st.downtime.total_ms) / st.downtime.total_ms
    assert abs(err) <= 0.15, (st.predicted, st.downtime)
    out = st.to_json()
    assert out["predicted-downtime"] == round(st.predicted_downtime_ms, 3)
    assert abs(out["downtime-prediction-error-pct"] - err * 100) < 0.1


def test_issue17_item4_prediction_counts_in_flight_bytes_and_round_trips() -> None:
    src = run(30, Probe(in_flight=6_000_000, rtt=0.004))
    p = src.stats.predicted
    bw = src.stats.passes[-1].bytes / src.stats.passes[-1].seconds
    assert abs(p["in_flight_ms"] - 6_000_000 / bw * 1e3) < 1e-6
    assert p["switchover_ms"] == SWITCHOVER_ROUND_TRIPS * 4.0


def test_issue17_item4_prediction_counts_stopping_and_the_hosts_fixed_costs() -> None:
    """Stopping the guest and reading the dirty log (timed in every pre-copy pass) and
    the hosts' measured fixed costs are parts of the prediction."""

    class SlowStop:
        def __init__(self, clock: ManualClock, vm: object) -> None:
            self.clock = clock

        def pause(self) -> None: ...

        def resume(self) -> None: ...

        def set_throttle(self, pct: int) -> None: ...

        def held(self) -> AbstractContextManager[object]:
            self.clock.advance(0.003)  # stopping the guest takes 3 ms
            return contextlib.nullcontext()

    vm = create_vm({"name": "s", "memory_mib": 32, "vcpus": 1, "fill": "random",
                    "workload": {"dirty_rate_mbps": 30, "pattern": "hot"}})
    vm.start()
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(downtime_limit_ms=50), clock,
                        guest=SlowStop(clock, vm), link=Probe(0, 0.0, fixed=0.007))
    migrate_locally(src, DestinationSession(clock), clock, link_bytes_per_s=60e6,
                    on_time=vm.run_slice)
    p = src.stats.predicted
    assert p["stop_ms"] >= 3.0 and p["fixed_ms"] == 7.0
    assert src.stats.predicted_downtime_ms == sum(p.values())


def test_issue17_item4_no_prediction_without_a_stop_decision() -> None:
    vm = create_vm({"name": "o", "memory_mib": 8, "vcpus": 1, "fill": "random"})
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(offline=True), clock)
    migrate_locally(src, DestinationSession(clock), clock, link_bytes_per_s=1e9)
    assert src.stats.predicted == {}
    assert "downtime-prediction-error-pct" not in src.stats.to_json()


def test_issue17_item4_small_pass_uses_the_links_measured_bandwidth() -> None:
    """A VM of untouched RAM with a large device state: its pass moves a few KiB, which
    measures nothing; the expected downtime uses what the link measured before."""
    device = {"id": "big0", "driver": "pds", "state_mib": 8, "dma_region": [1 << 20, 65536],
              "seed": 1}
    vm = create_vm({"name": "d", "memory_mib": 16, "fill": "zero", "devices": [device],
                    "workload": {"dirty_rate_mbps": 0}})
    vm.start()
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(), clock, link=Probe(0, 0.0, bw=5e10))
    migrate_locally(src, DestinationSession(clock), clock, link_bytes_per_s=1e9,
                    on_time=vm.run_slice)
    first = src.stats.passes[0]
    assert first.bytes < MEASURABLE_BYTES
    assert src.stats.link_bandwidth_bps == 0.0
    # the simulated pass "measured" 397 bytes in 64 ns; the link's 5e10 B/s is what counts
    implied = first.expected_downtime_ms * 1e-3 * 5e10
    assert 8 << 20 <= implied <= 9 << 20
    # a pass that moved enough measures the link itself: the hint is not used
    big = run(0, Probe(0, 0.0, bw=1e12))
    assert big.stats.passes[0].mbps < 1e6
    assert big.stats.link_bandwidth_bps > 0
