"""The sans-IO engine end to end in one process, on a simulated link and clock."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.clock import ManualClock
from vmferry.errors import MalformedRecord, MigrationError, StreamUsageError
from vmferry.machine import VM, create_vm
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import migrate_locally
from vmferry.migration.precopy import ConvergencePolicy, decide
from vmferry.migration.source import MigrationParams, SourceSession, page_runs
from vmferry.migration.stream import (
    End,
    RamPages,
    StreamDecoder,
    StreamEncoder,
    VcpuRecord,
    VmConfig,
)


class Link:
    """Moves a source session's bytes into a destination at ``bandwidth`` bytes/s of
    simulated time, letting the guest run for that time."""

    def __init__(self, vm: VM, params: MigrationParams, bandwidth: float = 1e9) -> None:
        self.clock = ManualClock()
        self.vm = vm
        self.src = SourceSession(vm, params, self.clock)
        self.dec = StreamDecoder()
        self.dst = DestinationSession(self.clock, verify=True)
        self.bandwidth = bandwidth

    def run_guest(self, dt: float) -> None:
        self.vm.run_slice(dt)

    def push(self, bufs: list[Any]) -> None:
        n = sum(len(b) for b in bufs)
        for b in bufs:
            self.dec.feed(b)
        for rec in self.dec.events():
            self.dst.receive(rec)
        dt = n / self.bandwidth
        self.clock.advance(dt)
        self.vm.run_slice(dt)

    def run(self) -> dict[str, Any]:
        ack = migrate_locally(self.src, self.dst, self.clock, link_bytes_per_s=self.bandwidth,
                              on_time=self.run_guest)
        return {"ack": ack, "source": self.src.switchover_digests()}


def vm_with(rate: float = 0.0, mib: int = 32, fill: str = "random", **kw: Any) -> VM:
    vm = create_vm(
        {
            "name": "e",
            "memory_mib": mib,
            "vcpus": 2,
            "fill": fill,
            "workload": {"dirty_rate_mbps": rate, **kw},
        }
    )
    vm.start()
    return vm


def test_idle_vm_one_pass_and_equal() -> None:
    link = Link(vm_with(), MigrationParams())
    out = link.run()
    st_ = link.src.stats
    assert st_.status is Status.COMPLETED and len(st_.passes) == 1
    assert out["ack"]["digests"] == out["source"]
    assert link.dst.vm is not None and link.dst.vm.running
    assert st_.ram_normal == link.vm.ram.npages and st_.ram_duplicate == 0


def test_zero_pages_are_coalesced() -> None:
    link = Link(vm_with(fill="zero", mib=64), MigrationParams())
    link.run()
    assert link.src.stats.ram_duplicate == link.vm.ram.npages
    assert link.src.encoder.records_out < 10


def test_dirtying_guest_converges_and_stays_equal() -> None:
    link = Link(
        vm_with(rate=30, pattern="uniform"), MigrationParams(downtime_limit_ms=50), bandwidth=60e6
    )
    out = link.run()
    st_ = link.src.stats
    assert len(st_.passes) >= 2
    assert out["ack"]["digests"]["ram"] == out["source"]["ram"]
    assert st_.passes[-1].expected_downtime_ms <= 50
    assert st_.passes[0].dirty_pages > st_.passes[-1].dirty_pages
    assert st_.downtime.total_ms >= 0


def test_auto_converge_throttles_progressively() -> None:
    vm = vm_with(rate=400, pattern="uniform", mib=64)
    link = Link(vm, MigrationParams(max_passes=3, downtime_limit_ms=5), bandwidth=100e6)
    out = link.run()
    throttles = [p.throttle_pct for p in link.src.stats.passes]
    assert throttles[:3] == [0, 0, 0]
    assert throttles[3:6] == [20, 30, 40]
    assert out["ack"]["digests"] == out["source"]


def test_offline_pauses_first() -> None:
    vm = vm_with(rate=50)
    link = Link(vm, MigrationParams(offline=True))
    link.run()
    assert len(link.src.stats.passes) == 1 and link.src.stats.dirty_sync_count == 0
    assert link.src.stats.ram_normal == vm.ram.npages
    assert link.src.stats.downtime.total_ms >= 0


def test_fail_gives_the_source_back() -> None:
    vm = vm_with(rate=40)
    link = Link(vm, MigrationParams(max_passes=1, downtime_limit_ms=0.001))
    link.push(link.src.start())
    link.push(link.src.next_buffers())
    while link.src.status is not Status.DEVICE:
        link.push(link.src.next_buffers())
    assert not vm.running
    stats = link.src.fail("switchover (final pass)", "connection lost")
    assert stats.status is Status.FAILED and vm.running and not vm.ram.logging
    assert vm.workload.throttle_pct == 0
    assert stats.error_step == "switchover (final pass)"
    with pytest.raises(StreamUsageError, match="in status failed"):  # no [] as if done
        link.src.next_buffers()


def test_cancel_status() -> None:
    link = Link(vm_with(), MigrationParams())
    link.push(link.src.start())
    assert link.src.fail("ram pass 1", "operator", cancelled=True).status is Status.CANCELLED


def test_no_convergence_gives_up() -> None:
    vm = vm_with(rate=4000, pattern="uniform", mib=16)
    params = MigrationParams(downtime_limit_ms=0.001, auto_converge=False)
    link = Link(vm, params, bandwidth=50e6)
    link.src.policy = ConvergencePolicy(downtime_limit_s=1e-6, auto_converge=False, give_up_after=4)
    with pytest.raises(MigrationError, match="no convergence"):
        link.run()


def test_bandwidth_cap_paces() -> None:
    clock = ManualClock()
    src = SourceSession(vm_with(), MigrationParams(max_bandwidth_mib=10), clock)
    src.start()
    src.next_buffers()
    assert src.pacing_delay() > 0.3  # 4 MiB sent in no time at 10 MiB/s
    clock.advance(10)
    assert src.pacing_delay() == 0


def test_precopy_decisions() -> None:
    pol = ConvergencePolicy(downtime_limit_s=0.3, max_passes=2)
    assert decide(pol, 1, 10_000_000, 1e9, 0).switchover
    assert not decide(pol, 1, 10**9, 1e8, 0).switchover
    assert decide(pol, 2, 10**9, 1e8, 0).throttle_pct == 20
    assert decide(pol, 3, 10**9, 1e8, 90).throttle_pct == 99


# --- destination strictness ----------------------------------------------------------------


def feed(records: list[Any]) -> DestinationSession:
    dst = DestinationSession(ManualClock())
    dec = StreamDecoder()
    dec.feed(StreamEncoder().encode_all(records))
    try:
        for rec in dec.events():
            dst.receive(rec)
    finally:
        dst.abort()
    return dst


CONFIG = VmConfig({"name": "d", "memory_mib": 1, "vcpus": 1})


@pytest.mark.parametrize(
    "records",
    [
        [RamPages(0, 4096, b"\0" * 4096)],  # before config
        [CONFIG, CONFIG],
        [CONFIG, RamPages(1024 * 1024, 4096, b"\0" * 4096)],  # outside RAM
        [CONFIG, RamPages(0, 65536, b"\0" * 65536)],  # wrong page size
        [CONFIG, VcpuRecord(3, ())],
        [CONFIG, End()],  # vCPU 0 missing
        [VmConfig({"name": "bad name", "memory_mib": 1})],
    ],
)
def test_destination_rejects(records: list[Any]) -> None:
    with pytest.raises(MalformedRecord):
        feed(records)


@given(st.lists(st.integers(0, 5000), unique=True, max_size=300), st.integers(1, 64))
def test_page_runs_cover_exactly(pages: list[int], max_len: int) -> None:
    index = np.array(sorted(pages), dtype=np.int64)
    starts, lengths = page_runs(index, max_len)
    rebuilt = [
        s + k for s, n in zip(starts.tolist(), lengths.tolist(), strict=True) for k in range(n)
    ]
    assert rebuilt == index.tolist()
    assert (lengths <= max_len).all() and (lengths >= 1).all()


def test_scattered_dirty_pages_travel_in_lists() -> None:
    from vmferry.migration.stream.inspect import summarize

    vm = vm_with(mib=16)
    src = SourceSession(vm, MigrationParams(), ManualClock())
    mask = np.zeros(vm.ram.npages, dtype=np.bool_)
    mask[[3, 7, 8, 100, 2000, 2001, 2002]] = True
    mask[500:600] = True  # a long run still goes as RAM_PAGES
    vm.ram.zero_pages(2000, 1)  # a zero page among the scattered ones
    out = bytearray(src.encoder.header())
    for bufs in src._send_pages(mask):
        for b in bufs:
            out += b
    for part in src.encoder.encode(End()):
        out += part
    s = summarize([bytes(out)])
    assert s.records["RamScatter"] == 2 and s.records["RamPages"] == 1
    assert s.pages_raw == 6 + 100 and s.pages_zero == 1
    dst = DestinationSession(ManualClock())
    dst.vm = create_vm({"name": "e", "memory_mib": 16})
    dec = StreamDecoder()
    dec.feed(bytes(out))
    for rec in dec.events():
        if not isinstance(rec, End):
            dst.receive(rec)
    for p in np.flatnonzero(mask).tolist():
        assert dst.vm.ram.read(p * 4096, 4096) == vm.ram.read(p * 4096, 4096)


def test_a_batch_filled_by_a_zero_record_does_not_clobber_pending_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pages: data, zero, data, zero, then 100 data pages.  With batches of 4150 bytes the
    # first zero record fills a batch; the page after it must not be copied into the bounce
    # buffer before that batch ships, or the 100-page record lands on top of it.
    import vmferry.migration.source as source_mod

    monkeypatch.setattr(source_mod, "BATCH_BYTES", 4150)
    vm = create_vm({"name": "b", "memory_mib": 1})
    for page in [0, 2, *range(4, 104)]:
        vm.ram.write(page * 4096, bytes([page % 251 + 1]) * 4096)
    src = SourceSession(vm, MigrationParams(), ManualClock())
    mask = np.zeros(vm.ram.npages, dtype=np.bool_)
    mask[:104] = True
    dst = DestinationSession(ManualClock())
    dst.vm = create_vm({"name": "b", "memory_mib": 1})
    dec = StreamDecoder()
    dec.feed(src.encoder.header())
    for bufs in src._send_pages(mask):
        for b in bufs:
            dec.feed(b)
        for rec in dec.events():
            dst.receive(rec)
    assert dst.vm.ram.digest() == vm.ram.digest()
