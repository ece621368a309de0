from __future__ import annotations

import numpy as np
import pytest

from vmferry.errors import ConfigError
from vmferry.guest.workload import Workload, WorkloadSpec
from vmferry.machine.ram import GuestRam

MIB = 1024 * 1024


def run(spec: WorkloadSpec, seconds: float, throttle: int = 0) -> tuple[Workload, GuestRam]:
    ram = GuestRam(64 * MIB)
    ram.start_dirty_log()
    w = Workload(spec, ram)
    w.set_throttle(throttle)
    for _ in range(10):
        w.run(seconds / 10)
    return w, ram


def test_rate_is_honoured() -> None:
    w, _ = run(WorkloadSpec(dirty_rate_mbps=10, pattern="uniform"), 1.0)
    assert w.pages_written == 10_000_000 // 4096


def test_throttle_scales_rate() -> None:
    w, _ = run(WorkloadSpec(dirty_rate_mbps=10, pattern="uniform"), 1.0, throttle=50)
    assert w.pages_written == 5_000_000 // 4096
    w.set_throttle(150)
    assert w.throttle_pct == 99


def test_hot_pattern_concentrates_writes() -> None:
    _, ram = run(
        WorkloadSpec(dirty_rate_mbps=40, pattern="hot", hot_fraction=0.1, hot_weight=0.9), 1.0
    )
    pages = ram.get_dirty_log().pages()
    hot = ram.npages // 10
    assert (pages < hot).sum() > (pages >= hot).sum()


def test_sequential_pattern_sweeps() -> None:
    _, ram = run(WorkloadSpec(dirty_rate_mbps=4.096, pattern="sequential"), 1.0)
    assert ram.get_dirty_log().pages().tolist() == list(range(1000))


def test_writes_really_change_memory() -> None:
    ram = GuestRam(4 * MIB)
    before = ram.digest()
    Workload(WorkloadSpec(dirty_rate_mbps=1), ram).run(0.1)
    assert ram.digest() != before


def test_idle_workload_writes_nothing() -> None:
    w, ram = run(WorkloadSpec(dirty_rate_mbps=0), 1.0)
    assert w.pages_written == 0 and ram.get_dirty_log().count == 0


@pytest.mark.parametrize(
    "bad", [{"pattern": "zigzag"}, {"dirty_rate_mbps": -1}, {"hot_fraction": 0}, {"speed": 3}]
)
def test_bad_specs(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        WorkloadSpec.from_definition(bad)


def test_deterministic_for_a_seed() -> None:
    _a, ra = run(WorkloadSpec(dirty_rate_mbps=5, seed=7), 0.5)
    _b, rb = run(WorkloadSpec(dirty_rate_mbps=5, seed=7), 0.5)
    assert ra.digest() == rb.digest()
    assert np.array_equal(ra.get_dirty_log().bitmap, rb.get_dirty_log().bitmap)
