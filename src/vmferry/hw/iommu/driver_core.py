"""The driver core's side of the probe: buses, client drivers, ``really_probe``, the
deferred-probe list and ``driver_deferred_probe_check_state`` (docs/models/iommu-probe.md §4.4,
§5.3).

``really_probe`` sets ``dev.driver`` *before* running the bus ``dma_configure`` hook and
clears it again when that hook fails; -EPROBE_DEFER puts the device on the deferred list,
which is re-triggered whenever a driver binds (here: :meth:`DriverCore.trigger`).  A probe
that defers after a trigger happened during it is retried at once, as the kernel does with
``deferred_trigger_count``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmferry.hw.iommu.core import BusAction, Device
from vmferry.hw.iommu.errors import Errno
from vmferry.sync import wait_until, yield_point

if TYPE_CHECKING:
    from vmferry.hw.iommu.kernel import Kernel

IGNORING_DEPENDENCY_WARNING = "ignoring dependency for device, assuming no driver"
DEFERRED_TIMEOUT_WARNING = "deferred probe timeout, ignoring dependency"


@dataclass(eq=False)
class Driver:
    """A client driver.  ``probe_calls`` counts runs of its own probe (after dma_configure)."""

    name: str
    driver_managed_dma: bool = False
    probe_calls: int = 0
    #: DMA ops the driver's buffers were mapped with, one entry per probe
    mapped_with: list[str | None] = field(default_factory=list)


class Bus:
    """A bus with a ``dma_configure`` hook (platform/PCI semantics of docs/models/iommu-probe.md
    §5.3)."""

    def __init__(self, name: str, kernel: Kernel) -> None:
        self.name = name
        self.k = kernel
        self.devices: list[Device] = []

    def dma_configure(self, dev: Device) -> int:
        """``of_dma_configure`` then, for a driver bind, ``use_default_domain``."""
        np = dev.host_bridge if dev.pci_rid is not None else dev.of_node
        ret = self.k.of.dma_configure_id(dev, np, force_dma=True)
        if ret:
            return ret
        yield_point(f"test {dev.name}.driver", dev.key, write=False)
        drv = dev.driver
        if drv is not None and not drv.driver_managed_dma:
            ret = self.k.core.use_default_domain(dev)
            if ret:
                dev.dma_ops = None  # arch_teardown_dma_ops
        return ret

    def __repr__(self) -> str:
        return f"Bus({self.name!r})"


class DriverCore:
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self.deferred: list[Device] = []
        #: deferred_trigger_count
        self.trigger_count = 0
        self.modules_enabled = kernel.modules_enabled
        self.initcalls_done = False
        self.timeout_expired = False

    def check_state(self, dev: Device) -> int:
        """``driver_deferred_probe_check_state``: defer, or give up on the dependency."""
        if not self.modules_enabled and self.initcalls_done:
            self.k.warn(IGNORING_DEPENDENCY_WARNING, dev.name)
            return -Errno.ENODEV
        if self.timeout_expired:
            self.k.warn(DEFERRED_TIMEOUT_WARNING, dev.name)
            return -Errno.ETIMEDOUT
        return -Errno.EPROBE_DEFER

    def device_add(self, dev: Device, bus: Bus) -> int:
        """Add ``dev`` to ``bus`` and send BUS_NOTIFY_ADD_DEVICE; returns the notifier value."""
        yield_point(f"device_add {dev.name}", ("bus", bus.name))
        dev.bus = bus
        bus.devices.append(dev)
        return self.k.core.bus_notifier(BusAction.ADD_DEVICE, dev)

    def device_del(self, dev: Device) -> int:
        bus = dev.bus
        if bus is None or dev not in bus.devices:
            return -Errno.ENODEV
        if dev.bound:
            self.unbind(dev)
        ret = self.k.core.bus_notifier(BusAction.REMOVED_DEVICE, dev)
        bus.devices.remove(dev)
        return ret

    def really_probe(self, dev: Device, drv: Driver) -> int:
        """Bind ``drv`` to ``dev``: driver set, dma_configure, then the driver's probe."""
        yield_point(f"really_probe {dev.name}", dev.key)
        dev.driver = drv
        dev.bound_during_probe = False
        ret = self.k.bus_of(dev).dma_configure(dev)
        if ret:
            yield_point(f"probe unwind {dev.name}", dev.key)
            dev.dma_ops = None
            dev.driver = None
            if ret == -Errno.EPROBE_DEFER and dev not in self.deferred:
                self.deferred.append(dev)
            return ret
        self._bind(dev, drv)
        return 0

    def _bind(self, dev: Device, drv: Driver) -> None:
        yield_point(f"driver probe {dev.name}", dev.key)
        group = dev.iommu_group
        if group is not None and (group.default_domain is None or dev.dma_ops != "iommu"):
            why = "has no default domain" if group.default_domain is None else "translates"
            self.k.violate(7, f"{dev.name} bound with {dev.dma_ops} DMA ops while its group {why}")
        dev.bound = True
        dev.bound_during_probe |= dev.name in self.k.core.initialising
        dev.dma_ops_at_bind = dev.dma_ops
        drv.probe_calls += 1
        drv.mapped_with.append(dev.dma_ops)
        if dev in self.deferred:
            self.deferred.remove(dev)

    def unbind(self, dev: Device) -> None:
        drv = dev.driver
        if drv is not None and not drv.driver_managed_dma:
            self.k.core.unuse_default_domain(dev)
        dev.bound = dev.bound_during_probe = False
        dev.driver = None
        dev.dma_ops = None

    def trigger(self) -> None:
        """A driver bound somewhere: retry the deferred list (``driver_deferred_probe_trigger``)."""
        yield_point("deferred probe trigger", "deferred_trigger")
        self.trigger_count += 1

    def _triggered_since(self, seen: int) -> Callable[[], bool]:
        return lambda: self.trigger_count != seen

    def probe_until_bound(self, dev: Device, drv: Driver, attempts: int = 8) -> int:
        """A client driver's probe with deferred retries, as async probing would run it.

        Waits for a deferred-probe trigger between attempts (a trigger that happened during
        an attempt retries at once).  Returns the last result.
        """
        ret = -Errno.EPROBE_DEFER
        for _ in range(attempts):
            seen = self.trigger_count
            ret = self.really_probe(dev, drv)
            if ret != -Errno.EPROBE_DEFER:
                return ret
            wait_until(f"deferred retry {dev.name}", self._triggered_since(seen),
                       "deferred_trigger", write=False)
        return ret
