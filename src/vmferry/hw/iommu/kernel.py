"""A host kernel as far as the IOMMU probe is concerned: the composition root.

:class:`Kernel` owns the heap, the warning log, the IOMMU core, the OF glue, the driver
core and the buses (``platform`` and ``pci``).  Invariant numbers refer to
docs/models/iommu-probe.md §11.4;
:meth:`Kernel.violate` raises :class:`~vmferry.errors.InvariantViolation` for the numbers
being checked and records the others.
"""

from __future__ import annotations

from vmferry.errors import InvariantViolation
from vmferry.hw.iommu.core import Device, DomainType, IommuCore
from vmferry.hw.iommu.driver_core import Bus, DriverCore
from vmferry.hw.iommu.errors import Errno, IommuError
from vmferry.hw.iommu.heap import Heap
from vmferry.hw.iommu.modes import ProbeMode
from vmferry.hw.iommu.of_iommu import OfIommu

#: invariants checked after every step in the v6.15 design (5 = hazards, always raised)
FULL_CHECKS = frozenset({1, 2, 3, 4, 6, 7, 8, 9})


class Kernel:
    def __init__(
        self,
        mode: ProbeMode | str = "v6_15",
        *,
        checks: frozenset[int] | None = None,
        modules_enabled: bool = True,
        strict_residuals: bool = False,
    ) -> None:
        self.mode = ProbeMode.parse(mode) if isinstance(mode, str) else mode
        #: invariant numbers that raise; default: all in the v6.15 design, none in legacy
        self.checking = (FULL_CHECKS if not self.mode.legacy_flow else frozenset()) \
            if checks is None else checks
        self.modules_enabled = modules_enabled
        #: treat the v6.15 design's residual window as invariant 7: a client driver that
        #: binds while a registration walk has dropped the probe lock inside init_device
        #: for the same device sees the walk's fresh fwspec, no group yet, and binds with
        #: dma-direct; the walk then switches it to iommu-dma.  Off by default (recorded
        #: as a warning) because the kernel does not close this window either.
        self.strict_residuals = strict_residuals
        self.heap = Heap()
        self.heap_groups: set[object] = set()
        self.warnings: list[tuple[str, str]] = []
        self.logs: list[str] = []
        self.violations: list[tuple[int, str]] = []
        self.default_domain_type = DomainType.DMA
        #: allocation kinds that fail once (fault injection for -ENOMEM paths)
        self.failing_allocs: set[str] = set()
        self.core = IommuCore(self)
        self.of = OfIommu(self)
        self.drivers = DriverCore(self)
        self.buses: dict[str, Bus] = {"platform": Bus("platform", self), "pci": Bus("pci", self)}

    def warn(self, tag: str, detail: str = "") -> None:
        self.warnings.append((tag, detail))

    def warned(self, tag: str) -> int:
        return sum(1 for t, _ in self.warnings if t == tag)

    def log(self, line: str) -> None:
        self.logs.append(line)

    def violate(self, number: int, message: str) -> None:
        self.violations.append((number, message))
        if number in self.checking:
            raise InvariantViolation(f"invariant {number}: {message}")

    def fail_alloc(self, kind: str) -> bool:
        if kind in self.failing_allocs:
            self.failing_allocs.discard(kind)
            return True
        return False

    def bus_of(self, dev: Device) -> Bus:
        if dev.bus is None:
            raise IommuError(Errno.ENODEV, f"{dev.name} is on no bus")
        return dev.bus

    def all_devices(self) -> list[Device]:
        return [d for bus in self.buses.values() for d in bus.devices]

    def device(self, name: str) -> Device:
        for dev in self.all_devices():
            if dev.name == name:
                return dev
        raise IommuError(Errno.ENODEV, f"no device {name!r}")

    def place(self, dev: Device, bus: str = "platform") -> Device:
        """Put ``dev`` on a bus without notifying anyone (devices present at boot)."""
        if bus not in self.buses:
            raise IommuError(Errno.EINVAL, f"unknown bus {bus!r}")
        if any(d.name == dev.name for d in self.all_devices()):
            raise IommuError(Errno.EEXIST, f"device {dev.name!r} already exists")
        dev.bus = self.buses[bus]
        self.buses[bus].devices.append(dev)
        return dev
