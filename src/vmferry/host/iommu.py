"""A host's IOMMU boot probe: the groups device assignment uses.

An arm64 host builds its device tree -- SMMU instances, PCIe root complexes with an
``iommu-map``, devices with ``iommus`` bindings -- and probes it through the IOMMU core
model at start, with both entry points racing as at a real boot
(:func:`vmferry.hw.iommu.boot_probe`).  The topology comes from the host platform file's
``[iommu]`` table (``iommus``, ``bridges``, ``devices``; optional ``mode`` and ``seed``),
or, on an arm64 host without one, from :data:`DEFAULT_ARM64_TOPOLOGY`.  Hosts of other
architectures do not probe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmferry.errors import ConfigError, VmferryError
from vmferry.hw.iommu import BootResult, boot_probe

#: One SMMUv3 behind a PCIe root complex with two assignable functions, plus a platform
#: UART that uses the SMMU directly.
DEFAULT_ARM64_TOPOLOGY: dict[str, Any] = {
    "iommus": [{"name": "smmu0", "cells": 1}],
    "bridges": [{"name": "pcie0", "iommu_map": [[0, "smmu0", 0, 65536]]}],
    "devices": [
        {"name": "uart0", "iommus": [["smmu0", 3]], "driver": "pl011"},
        {"name": "0000:01:00.0", "bus": "pci", "bridge": "pcie0", "rid": 0x100,
         "driver": "vfio-pci", "driver_managed_dma": True},
        {"name": "0000:02:00.0", "bus": "pci", "bridge": "pcie0", "rid": 0x200,
         "driver": "vfio-pci", "driver_managed_dma": True},
    ],
}


def probe_host(arch: str | None, platform: Mapping[str, Any]) -> BootResult | None:
    """Probe the host's IOMMUs at start; None for a host that has none to probe."""
    spec = platform.get("iommu")
    if spec is None and arch != "arm64":
        return None
    topology = dict(spec) if isinstance(spec, Mapping) else dict(DEFAULT_ARM64_TOPOLOGY)
    mode = str(topology.pop("mode", "v6_15"))
    seed = topology.pop("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError("iommu seed must be an integer")
    try:
        return boot_probe(topology, mode=mode, seed=seed)
    except VmferryError as exc:
        raise ConfigError(f"host IOMMU topology: {exc}") from exc


def describe(result: BootResult | None) -> dict[str, Any] | None:
    """The probe as the control API reports it."""
    if result is None:
        return None
    return {
        "mode": result.mode,
        "seed": result.seed,
        "ok": result.ok,
        "groups": result.groups,
        "failures": result.failures,
        "iommus": result.iommus,
        "hazard": result.hazard,
    }
