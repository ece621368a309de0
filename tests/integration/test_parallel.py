"""Issue 17 item 1: RAM over parallel data channels between two host daemons."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Pair, digest, vm_names

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("parallel", [0, 3])
def test_issue17_item1_parallel_channels_move_a_dirtying_guest(pair: Pair, parallel: int
                                                               ) -> None:  # fmt: skip
    name = f"par-{parallel}"
    pair.create(name, memory_mib=48, workload={"dirty_rate_mbps": 20, "pattern": "hot"})
    job = pair.migrate(name, parallel=parallel, downtime_limit_ms=100)
    assert job["status"] == "completed", job
    assert job["stats"]["verification"]["verified"] is True
    assert job["progress"].get("parallel", 0) == parallel
    assert name in vm_names(pair.b) and pair.b.get(f"/v1/vms/{name}")["runstate"] == "running"
    pair.b.delete(f"/v1/vms/{name}")


def test_issue17_item1_a_cut_channel_fails_the_migration_and_the_source_keeps_running(
    pair: Pair,
) -> None:
    name = "par-cut"
    pair.create(name, memory_mib=48)
    before = digest(pair.a, name)
    job = pair.migrate(name, parallel=2, fault="cut-channel:1")
    assert job["status"] == "failed", job
    assert "cut-channel:1" in job["error"] and "ram pass 1" in job["step"], job
    vm = pair.a.get(f"/v1/vms/{name}")
    assert vm["runstate"] == "running" and digest(pair.a, name)["ram"] == before["ram"]
    assert name not in vm_names(pair.b)
    # and the same VM migrates afterwards over the channels
    assert pair.migrate(name, parallel=2)["status"] == "completed"
    pair.b.delete(f"/v1/vms/{name}")


def test_issue17_item1_a_channel_cut_mid_scatter_fails_and_the_source_keeps_running(
    pair: Pair,
) -> None:
    """A guest that dirties scattered pages: pass 2 moves them in SCATTER lists, and
    channel 1 is cut after its first batch of them."""
    name = "par-cut-scatter"
    pair.create(name, memory_mib=48, workload={"dirty_rate_mbps": 20, "pattern": "uniform"})
    job = pair.migrate(name, parallel=2, fault="cut-channel:1:2", downtime_limit_ms=1)
    assert job["status"] == "failed", job
    assert "cut-channel:1:2" in job["error"] and "ram pass 2" in job["step"], job
    vm = pair.a.get(f"/v1/vms/{name}")
    assert vm["runstate"] == "running"
    assert name not in vm_names(pair.b)
    # and it migrates afterwards, its dirty passes over the channels
    assert pair.migrate(name, parallel=2)["status"] == "completed"
    pair.b.delete(f"/v1/vms/{name}")
