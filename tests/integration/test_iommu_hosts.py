"""Hosts probe their IOMMUs at start and assign devices from the resulting groups."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Pair
from vmferry.errors import ApiError
from vmferry.host.processes import spawn_host

pytestmark = pytest.mark.integration

PLATFORM = """
vfio_drivers = ["mlx5", "pds"]
[iommu]
mode = "v6_15"
seed = 7
iommus = [{name = "smmu0", cells = 1}, {name = "smmu1", cells = 1, status = "disabled"}]
bridges = [{name = "pcie0", iommu_map = [[0, "smmu0", 0, 65536]]}]
[[iommu.devices]]
name = "0000:01:00.0"
bus = "pci"
bridge = "pcie0"
rid = 256
driver = "vfio-pci"
driver_managed_dma = true
[[iommu.devices]]
name = "0000:02:00.0"
bus = "pci"
bridge = "pcie0"
rid = 512
driver = "vfio-pci"
driver_managed_dma = true
[[iommu.devices]]
name = "0000:03:00.0"
iommus = [["smmu1", 3]]
driver = "vfio-pci"
driver_managed_dma = true
"""


@pytest.fixture
def arm64_pair(tmp_path: Path) -> Iterator[Pair]:
    plat = tmp_path / "platform.toml"
    plat.write_text(PLATFORM)
    args = ["--profile", "arm64-linux-6.15", "--platform", str(plat)]
    a = spawn_host("A", tmp_path / "A", extra_args=args)
    b = spawn_host("B", tmp_path / "B", extra_args=args)
    try:
        yield Pair(a, b)
    finally:
        a.stop()
        b.stop()


def vm(name: str, host_device: str) -> dict[str, object]:
    return {"definition": {"name": name, "arch": "arm64", "memory_mib": 16, "devices": [
        {"id": "nic0", "driver": "mlx5", "state_mib": 1, "host_device": host_device,
         "dma_region": [0, 1048576]}]},
        "start": True}


def test_host_reports_its_probe_and_refuses_unusable_devices(arm64_pair: Pair) -> None:
    iommu = arm64_pair.a.get("/v1/host")["iommu"]
    assert iommu["mode"] == "v6_15" and not iommu["ok"]
    assert "0000:03:00.0" in iommu["failures"]
    assert iommu["groups"]["0000:01:00.0"] is not None
    with pytest.raises(ApiError, match=r"cannot assign 0000:03:00\.0"):
        arm64_pair.a.post("/v1/vms", vm("bad", "0000:03:00.0"))
    arm64_pair.a.post("/v1/vms", vm("good", "0000:01:00.0"))
    with pytest.raises(ApiError, match=r"IOMMU group .* assigned to VM good"):
        arm64_pair.a.post("/v1/vms", vm("thief", "0000:01:00.0"))
    arm64_pair.a.post("/v1/vms", vm("other", "0000:02:00.0"))


def test_assigned_device_migrates_when_the_destination_group_is_free(arm64_pair: Pair) -> None:
    arm64_pair.a.post("/v1/vms", vm("mover", "0000:01:00.0"))
    arm64_pair.b.post("/v1/vms", vm("squatter", "0000:01:00.0"))
    with pytest.raises(ApiError, match="assigned to VM squatter"):
        arm64_pair.migrate("mover")
    assert arm64_pair.a.get("/v1/vms/mover")["runstate"] == "running"
    arm64_pair.b.delete("/v1/vms/squatter")
    job = arm64_pair.migrate("mover")
    assert job["status"] == "completed", job
    assert job["stats"]["verification"]["verified"]
