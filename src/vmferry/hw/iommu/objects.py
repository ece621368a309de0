"""The objects the IOMMU core's probe paths work on (docs/models/iommu-probe.md §2):
instances, domains, groups, devices, and the driver ops protocol.

:func:`device_state` names a device's probe state (S0 idle, S1 init, S2 configured,
S3 driver-probed, S4 grouped, S5 probed).  Each shared object has a ``key``: the name
the model's yield points declare when they touch it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Protocol

from vmferry.hw.iommu.dt import DtNode, PhandleArgs
from vmferry.hw.iommu.fwspec import DevIommu
from vmferry.hw.iommu.heap import Ref
from vmferry.sync import ModelLock

if TYPE_CHECKING:
    from vmferry.hw.iommu.driver_core import Bus, Driver
    from vmferry.hw.iommu.kernel import Kernel


class DomainType(IntEnum):
    """IOMMU_DOMAIN_* (include/linux/iommu.h)."""

    BLOCKED = 0
    UNMANAGED = 1
    DMA = 3
    IDENTITY = 4
    DMA_FQ = 11
    SVA = 16
    PLATFORM = 32
    NESTED = 64

    @property
    def translated(self) -> bool:
        return self in (DomainType.DMA, DomainType.DMA_FQ)


class BusAction(IntEnum):
    """BUS_NOTIFY_* actions the IOMMU notifier handles."""

    ADD_DEVICE = 1
    REMOVED_DEVICE = 3


@dataclass(eq=False)
class Module:
    """A kernel module owning driver ops (try_module_get / module_put)."""

    name: str
    refcount: int = 0
    going: bool = False

    def try_get(self) -> bool:
        if self.going:
            return False
        self.refcount += 1
        return True

    def put(self) -> None:
        self.refcount -= 1


class IommuOps(Protocol):
    """``struct iommu_ops`` (probe-related members, docs/models/iommu-probe.md §2.7); see
    drivers.py."""

    name: str
    owner: Module | None
    in_module: bool
    has_of_xlate: bool

    def probe_device(self, kernel: Kernel, dev: Device) -> IommuDevice | int: ...
    def release_device(self, kernel: Kernel, dev: Device) -> None: ...
    def probe_finalize(self, kernel: Kernel, dev: Device) -> None: ...
    def device_group(self, kernel: Kernel, dev: Device) -> Group | int | None: ...
    def of_xlate(self, kernel: Kernel, dev: Device, spec: PhandleArgs) -> int: ...
    def def_domain_type(self, dev: Device) -> int: ...


@dataclass(eq=False)
class IommuDevice:
    """``struct iommu_device``: one hardware instance."""

    name: str
    ops: IommuOps | None = None
    fwnode: DtNode | None = None
    #: set only after iommu_device_register's bus walk completed (da33e87bd2bf)
    ready: bool = False
    listed: bool = False
    singleton_group: Group | None = None
    #: sysfs <iommu>/devices/ links
    links: set[str] = field(default_factory=set)

    @property
    def key(self) -> Hashable:
        return ("iommu", self.name)


@dataclass(eq=False)
class Domain:
    type: DomainType


@dataclass(eq=False)
class GroupDevice:
    dev: Device
    name: str


@dataclass(eq=False)
class Group:
    """``struct iommu_group``.  ``refcount`` counts dev.iommu_group holders + explicit ones."""

    id: int
    mutex: ModelLock
    devices: list[GroupDevice] = field(default_factory=list)
    default_domain: Domain | None = None
    blocking_domain: Domain | None = None
    domain: Domain | None = None
    owner_cnt: int = 0
    #: DMA owner other than the kernel (VFIO / iommufd)
    owner: str | None = None
    refcount: int = 1
    queued: bool = False
    freed: bool = False
    #: how the default domain was set up: "walk" (phase 2) or "immediate" (hot-plug/replay)
    setup_path: str = ""
    #: names of the IOMMU instances that were not ready when the default domain was set up
    setup_while_unready: tuple[str, ...] = ()

    @property
    def key(self) -> Hashable:
        return ("group", self.id)

    def members(self) -> list[Device]:
        return [g.dev for g in self.devices]


@dataclass(eq=False)
class Device:
    """``struct device`` (the fields the probe touches, docs/models/iommu-probe.md §2.1)."""

    name: str
    bus: Bus | None = None
    of_node: DtNode | None = None
    #: PCI requester ID and DMA aliases (PCI devices only)
    pci_rid: int | None = None
    dma_aliases: tuple[int, ...] = ()
    #: PCI host bridge node carrying iommu-map / ats-supported (PCI devices only)
    host_bridge: DtNode | None = None
    #: devices with the same alias_group share an IOMMU group (pci_device_group)
    alias_group: str | None = None
    driver: Driver | None = None
    #: the client driver's probe completed and it is bound
    bound: bool = False
    iommu: Ref[DevIommu] | None = None
    iommu_group: Group | None = None
    dma_ops: str | None = None
    dma_ops_at_bind: str | None = None
    dma_range_map: object | None = None
    #: the driver's bind overlapped a registration walk inside init_device for this device
    #: (the v6.15 residual window, see Kernel.strict_residuals)
    bound_during_probe: bool = False

    @property
    def key(self) -> Hashable:
        return ("dev", self.name)


def device_state(dev: Device) -> str:
    """The docs/models/iommu-probe.md §5.6 state name of ``dev`` (S0..S5), or "?" for a state
    outside it."""
    if dev.iommu is None:
        return "S0" if dev.iommu_group is None else "?"
    if dev.iommu.freed:
        return "?"
    p = dev.iommu.get()
    if p.fwspec is None:
        return "S1" if p.iommu_dev is None and dev.iommu_group is None else "?"
    if p.iommu_dev is None:
        return "S2" if dev.iommu_group is None else "?"
    if dev.iommu_group is None:
        return "S3"
    return "S5" if dev.iommu_group.default_domain is not None else "S4"
