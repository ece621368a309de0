from __future__ import annotations

from typing import Any

import pytest

from vmferry.errors import ConfigError
from vmferry.host.iommu import DEFAULT_ARM64_TOPOLOGY, probe_host
from vmferry.machine import HostContext, create_vm

BROKEN: dict[str, Any] = {
    "iommus": [{"name": "smmu0", "cells": 1}, {"name": "smmu1", "cells": 1,
                                                "status": "disabled"}],
    "bridges": [{"name": "pcie0", "iommu_map": [[0, "smmu0", 0, 65536]]}],
    "devices": [
        {"name": "0000:01:00.0", "bus": "pci", "bridge": "pcie0", "rid": 256,
         "driver": "vfio-pci", "driver_managed_dma": True},
        {"name": "0000:03:00.0", "iommus": [["smmu1", 3]], "driver": "vfio-pci",
         "driver_managed_dma": True},
    ],
}


def test_arm64_hosts_probe_the_default_topology() -> None:
    probe = probe_host("arm64", {})
    assert probe is not None and probe.ok
    pci = [d["name"] for d in DEFAULT_ARM64_TOPOLOGY["devices"] if d.get("bus") == "pci"]
    assert all(probe.groups[name] is not None for name in pci)


def test_generic_hosts_do_not_probe() -> None:
    assert probe_host(None, {}) is None
    assert probe_host("pseries", {}) is None


def test_a_failed_probe_says_why() -> None:
    probe = probe_host(None, {"iommu": BROKEN})
    assert probe is not None and not probe.ok
    assert "0000:03:00.0" in probe.failures and probe.groups["0000:01:00.0"] is not None


def test_bad_topology_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="topology"):
        probe_host("arm64", {"iommu": {"devices": [{"name": "x", "iommus": [["nope", 1]]}]}})


def _vm(host: HostContext, host_device: str) -> None:
    create_vm({"name": "a", "memory_mib": 8, "devices": [
        {"id": "nic0", "driver": "mlx5", "host_device": host_device,
         "dma_region": [0, 65536], "state_mib": 1}]}, host).close()


def test_assignment_uses_the_probe() -> None:
    host = HostContext("h", platform={"iommu": BROKEN}, iommu=probe_host(None,
                                                                         {"iommu": BROKEN}))
    _vm(host, "0000:01:00.0")
    with pytest.raises(ConfigError, match=r"cannot assign 0000:03:00\.0: not probed"):
        _vm(host, "0000:03:00.0")
    with pytest.raises(ConfigError, match="not an IOMMU-backed device"):
        _vm(host, "0000:09:00.0")
    with pytest.raises(ConfigError, match="no IOMMU topology"):
        _vm(HostContext("plain"), "0000:01:00.0")
