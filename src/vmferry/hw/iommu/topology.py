"""Helpers to build probe topologies: IOMMU instances with their DT nodes and drivers, and
client devices whose ``iommus`` property points at them."""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.hw.iommu.core import Device, IommuDevice
from vmferry.hw.iommu.drivers import SmmuDriver
from vmferry.hw.iommu.dt import DtNode
from vmferry.hw.iommu.errors import Errno, IommuError
from vmferry.hw.iommu.kernel import Kernel


@dataclass(eq=False)
class IommuHandle:
    """An IOMMU instance, its hardware DT node and its driver's ops."""

    inst: IommuDevice
    node: DtNode
    driver: SmmuDriver

    @property
    def name(self) -> str:
        return self.inst.name


def iommu(
    name: str, *, cells: int = 1, driver: SmmuDriver | None = None, status: str = "okay"
) -> IommuHandle:
    """A not-yet-registered instance with a ``#iommu-cells`` node."""
    node = DtNode(name, {"#iommu-cells": cells, "status": status})
    return IommuHandle(IommuDevice(name), node, driver or SmmuDriver(f"{name}-driver"))


def client(name: str, *specs: tuple[IommuHandle, int]) -> Device:
    """A platform device whose ``iommus`` lists ``<&iommu id>`` for each spec."""
    cells: list[object] = []
    for handle, master_id in specs:
        cells += [handle.node, master_id]
    props: dict[str, object] = {"iommus": cells} if specs else {}
    return Device(name, of_node=DtNode(name, props))


def register(kernel: Kernel, handle: IommuHandle) -> int:
    """``iommu_device_register`` for ``handle``; refuses a second registration."""
    if handle.inst.listed:
        raise IommuError(Errno.EBUSY, f"{handle.name} is already registered")
    return kernel.core.device_register(handle.inst, handle.driver, handle.node)


def register_and_trigger(kernel: Kernel, handle: IommuHandle) -> int:
    """Registration from the IOMMU driver's probe; its bind re-triggers deferred probes."""
    ret = register(kernel, handle)
    kernel.drivers.trigger()
    return ret
