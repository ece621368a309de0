"""The IOMMU core's device probe: iommu_fwspec, dev->iommu, of_xlate, groups, both
concurrent entry points, and the historical races (docs/models/iommu-probe.md).

Public surface::

    Kernel(mode="v6_15", checks=None, modules_enabled=True, strict_residuals=False)
        .core (IommuCore) .of (OfIommu) .drivers (DriverCore) .buses .heap .warnings
    ProbeMode.parse("v6_15+relock_no_recheck"); PRESETS; SWITCHES
    iommu(name, ...) / client(name, (handle, id), ...) / register(kernel, handle)
    boot_probe(platform_description, mode="v6_15", seed=0) -> BootResult
"""

from __future__ import annotations

from vmferry.hw.iommu.boot import BootResult, DeviceReport, boot_probe
from vmferry.hw.iommu.core import (
    LATE_PROBE_WARNING,
    Device,
    Domain,
    DomainType,
    Group,
    IommuCore,
    IommuDevice,
    device_state,
)
from vmferry.hw.iommu.driver_core import Bus, Driver, DriverCore
from vmferry.hw.iommu.drivers import SmmuDriver
from vmferry.hw.iommu.dt import DtNode, PhandleArgs
from vmferry.hw.iommu.errors import Errno, IommuError, LockdepError, MemoryLeak, NullDeref
from vmferry.hw.iommu.fwspec import DevIommu, Fwspec
from vmferry.hw.iommu.kernel import Kernel
from vmferry.hw.iommu.modes import DEFAULT_MODE, PRESETS, SWITCHES, ProbeMode
from vmferry.hw.iommu.of_iommu import OfIommu
from vmferry.hw.iommu.topology import IommuHandle, client, iommu, register

__all__ = [
    "DEFAULT_MODE",
    "LATE_PROBE_WARNING",
    "PRESETS",
    "SWITCHES",
    "BootResult",
    "Bus",
    "DevIommu",
    "Device",
    "DeviceReport",
    "Domain",
    "DomainType",
    "Driver",
    "DriverCore",
    "DtNode",
    "Errno",
    "Fwspec",
    "Group",
    "IommuCore",
    "IommuDevice",
    "IommuError",
    "IommuHandle",
    "Kernel",
    "LockdepError",
    "MemoryLeak",
    "NullDeref",
    "OfIommu",
    "PhandleArgs",
    "ProbeMode",
    "SmmuDriver",
    "boot_probe",
    "client",
    "device_state",
    "iommu",
    "register",
]
