"""Issue 17 item 4: the downtime predicted at the stop decision, and its error."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from vmferry.clock import ManualClock
from vmferry.machine import create_vm
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import migrate_locally
from vmferry.migration.prediction import (
    DIGEST_SLICE,
    MEASURABLE_PAGES,
    SETTLE_BOUND_S,
    SWITCHOVER_ROUND_TRIPS,
    PrecopyMeter,
)
from vmferry.migration.source import MEASURABLE_BYTES, MigrationParams, SourceSession


class Probe:
    def __init__(self, in_flight: int, rtt: float, bw: float = 0.0, fixed: float = 0.0
                 ) -> None:  # fmt: skip
        self.in_flight, self.rtt, self.bw, self.fixed = in_flight, rtt, bw, fixed
        self.settled = self.quiets = 0

    def fixed_switchover_s(self) -> float:
        return self.fixed

    def settle(self) -> None:
        self.settled += 1

    def quiet(self) -> None:
        self.quiets += 1

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
    # the host's settle() waits what is in flight out with the guest running (at most
    # SETTLE_BOUND_S): none of it is downtime here ...
    assert 6_000_000 / bw < SETTLE_BOUND_S and p["in_flight_ms"] == 0.0
    assert p["switchover_ms"] == SWITCHOVER_ROUND_TRIPS * 4.0
    # ... and beyond the bound the rest drains with the guest paused
    big = int(bw * (SETTLE_BOUND_S + 0.5))
    src = run(30, Probe(in_flight=big, rtt=0.004))
    bw = src.stats.passes[-1].bytes / src.stats.passes[-1].seconds
    extra_ms = (big / bw - SETTLE_BOUND_S) * 1e3
    assert extra_ms > 0 and abs(src.stats.predicted["in_flight_ms"] - extra_ms) < 1e-6


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


# --- the pre-copy's own measurements (PrecopyMeter), on a clock that only tests move ---


class TickClock(ManualClock):
    """Every reading moves time by ``tick`` seconds (a timed call costs one tick)."""

    def __init__(self, tick: float) -> None:
        super().__init__()
        self.tick = tick

    def monotonic(self) -> float:
        self.advance(self.tick)
        return super().monotonic()


def meter(npages: int = 1 << 16, clock: ManualClock | None = None) -> PrecopyMeter:
    return PrecopyMeter(clock or ManualClock(), 4096, npages)


def test_issue17_item4_final_ram_is_pages_at_the_measured_cost_per_page() -> None:
    """The last pass sent 2000 non-zero pages in 0.5 s: 250 us a page, whatever the
    bandwidth says; the 100 dirty pages of the final pass cost 25 ms."""
    m = meter()
    m.sent(0.5, 2000)
    assert m.page_cost_s == 0.5 / 2000
    p = m.predict(None, 100, 0.0, 0, bandwidth=1e12)
    assert abs(p["final_ram_ms"] - 25.0) < 1e-9
    # a later pass too small to measure keeps the cost the earlier one measured
    m.sent(0.001, MEASURABLE_PAGES - 1)
    assert m.page_cost_s == 0.5 / 2000


def test_issue17_item4_unmeasured_page_cost_falls_back_to_the_bandwidth() -> None:
    m = meter()
    m.sent(0.001, 10)  # too few pages: the pass's overhead, not the pages
    assert m.page_cost_s == 0.0
    p = m.predict(None, 1000, 0.0, 8 << 20, bandwidth=4096e3)  # 1000 pages/s
    assert abs(p["final_ram_ms"] - 1000.0) < 1e-9
    assert abs(p["state_ms"] - (8 << 20) / 4096e3 * 1e3) < 1e-9


def test_issue17_item4_final_pass_grows_at_the_dirty_rate_until_the_stop() -> None:
    """What is in flight at the decision reaches the destination before the stop, with
    the guest running: at 0.1 s of it and 5000 pages/s dirtied, 500 pages more."""
    m = meter(npages=10_000)
    m.sent(1.0, 10_000)  # 100 us a page
    bw = 100e6
    link = Probe(in_flight=int(0.1 * bw), rtt=0.002, fixed=0.004)
    p = m.predict(link, 1000, 5000.0, 0, bw)
    assert m.final_pages(1000, 5000.0, 0.1) == 1500
    assert abs(p["final_ram_ms"] - 1500 * 0.1) < 1e-6
    assert p["in_flight_ms"] == 0.0  # drained before the stop, the guest running
    assert p["switchover_ms"] == SWITCHOVER_ROUND_TRIPS * 2.0 and p["fixed_ms"] == 4.0
    # never more than every page of the guest
    assert m.final_pages(9000, 1e9, 1.0) == 10_000


def test_issue17_item4_stop_and_dirty_log_read_are_the_measured_ones() -> None:
    m = meter()
    m.stopped(0.004)
    m.stopped(0.001)  # a decaying maximum: 2 ms
    m.synced(0.003)
    m.synced(0.0005)  # the last read counts
    assert abs(m.predict(None, 0, 0.0, 0, 1e9)["stop_ms"] - 2.5) < 1e-9


def test_issue17_item4_verification_is_ram_at_the_measured_hash_rate() -> None:
    """Hashing a 16 MiB slice took one tick (1 ms): 64 MiB of RAM take 4 ms to verify;
    the rate is measured once; without verification the part is zero."""
    vm = create_vm({"name": "v", "memory_mib": 64, "vcpus": 1, "fill": "random"})
    clock = TickClock(0.001)
    m = PrecopyMeter(clock, vm.ram.page_size, vm.ram.npages)
    assert meter().predict(None, 0, 0.0, 0, 1e9)["verification_ms"] == 0.0
    p = m.predict(None, 0, 0.0, 0, 1e9, verify=vm.ram)
    assert abs(m.digest_bps - DIGEST_SLICE / 0.001) < 1e-3
    assert abs(p["verification_ms"] - 4.0) < 1e-9
    clock.tick = 1.0  # not timed again
    assert abs(m.predict(None, 0, 0.0, 0, 1e9, verify=vm.ram)["verification_ms"] - 4.0) < 1e-9


def test_issue17_item4_session_measures_its_passes_for_the_prediction() -> None:
    """A dirtying guest over a simulated 60 MB/s link: the session timed the pages of its
    passes (the cost of a page is a page's bytes at the link's rate, plus its framing)."""
    src = run(30, None)
    ps = src.vm.ram.page_size
    assert ps / 60e6 <= src.meter.page_cost_s <= 1.1 * ps / 60e6
    last = src.stats.passes[-1]
    bw = last.bytes / last.seconds
    assert src.stats.predicted["final_ram_ms"] == (
        src.meter.final_pages(last.dirty_pages, last.dirty_pages_rate, 0.0)
        * src.meter.page_s(src.meter.final_scattered, bw) * 1e3)
