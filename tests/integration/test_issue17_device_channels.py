"""Issue 17, item 3 between two host daemons: a pre-copy device migrates with
switchover-ack, device state rides the parallel channels in the stop, and a channel cut
while it carries device state fails the migration with the source still running."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Pair, vm_names

pytestmark = pytest.mark.integration


def devices(driver: str) -> list[dict[str, Any]]:
    return [{"id": "nic0", "driver": driver, "state_mib": 2,
             "dma_region": [0x100000, 0x10000], "seed": 9}]  # fmt: skip


@pytest.mark.parametrize(("driver", "parallel"), [("mlx5", 0), ("mlx5", 2), ("pds", 2)])
def test_issue17_3_device_state_migrates(pair: Pair, driver: str, parallel: int) -> None:
    name = f"dev-{driver}-{parallel}"
    pair.create(name, memory_mib=16, devices=devices(driver))
    job = pair.migrate(name, parallel=parallel)
    assert job["status"] == "completed", job
    stats = job["stats"]
    assert stats["verification"]["verified"] is True
    if driver == "mlx5":  # pre-copy: the ack came, with the destination's load time
        assert stats["switchover-ack"]["device_bytes"] >= 2 << 20
        assert "device_load_ms" in stats["predicted-downtime-breakdown"]
    else:  # no pre-copy: nothing to acknowledge
        assert "switchover-ack" not in stats
    assert pair.b.get(f"/v1/vms/{name}")["runstate"] == "running"
    pair.b.delete(f"/v1/vms/{name}")


def test_issue17_3_a_channel_cut_during_device_state_keeps_the_source(pair: Pair) -> None:
    name = "dev-cut"
    pair.create(name, memory_mib=16, devices=devices("pds"))
    job = pair.migrate(name, parallel=2, fault="cut-device-channel:1")
    assert job["status"] == "failed", job
    assert "cut-device-channel:1" in job["error"], job
    vm = pair.a.get(f"/v1/vms/{name}")
    assert vm["runstate"] == "running"
    assert job["stats"]["ram"]["transferred"] > 2 << 20  # the cut came in the stop
    assert name not in vm_names(pair.b)
    assert pair.migrate(name, parallel=2)["status"] == "completed"
    pair.b.delete(f"/v1/vms/{name}")
