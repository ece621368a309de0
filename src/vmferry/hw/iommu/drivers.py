"""Reference IOMMU drivers plugged into the core through their ops (docs/models/iommu-probe.md
§2.7, §8).

:class:`SmmuDriver` behaves like an SMMU-style driver: ``of_xlate`` appends the first
specifier cell to the fwspec, ``probe_device`` rejects devices whose fwspec does not name
one of its instances and allocates its per-device data (``dev_iommu_priv_set``),
``release_device`` frees it.  In the ``leaky_of_xlate_driver`` mode the per-device data is
allocated in ``of_xlate`` instead (the Exynos pattern) and freed only by ``release_device``,
so every configure attempt that ends in an error or -EPROBE_DEFER leaks it
(docs/models/iommu-probe.md §8).

Fault knobs (``fail_of_xlate``, ``fail_probe``, ``null_group``) drive the error paths of
the conformance checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmferry.hw.iommu.core import Device, Group, IommuDevice, Module
from vmferry.hw.iommu.dt import PhandleArgs
from vmferry.hw.iommu.errors import Errno
from vmferry.sync import yield_point

if TYPE_CHECKING:
    from vmferry.hw.iommu.kernel import Kernel

GROUP_POLICIES = ("generic", "singleton", "pci")


@dataclass(frozen=True, eq=False)
class DriverData:
    """The driver's per-device structure (``struct arm_smmu_master`` and friends)."""

    dev: str
    allocated_in: str


@dataclass(eq=False)
class SmmuDriver:
    name: str
    owner: Module | None = None
    in_module: bool = False
    has_of_xlate: bool = True
    group_policy: str = "generic"
    #: (device name, of_xlate call index) -> negative errno to return
    fail_of_xlate: dict[tuple[str, int], int] = field(default_factory=dict)
    #: device name -> negative errno probe_device returns
    fail_probe: dict[str, int] = field(default_factory=dict)
    #: devices for which device_group returns NULL
    null_group: set[str] = field(default_factory=set)
    #: device name -> def_domain_type answer (0, IDENTITY or DMA)
    def_types: dict[str, int] = field(default_factory=dict)
    xlate_calls: dict[str, int] = field(default_factory=dict)
    probe_calls: int = 0
    release_calls: int = 0
    finalize_calls: int = 0

    # --- ops -------------------------------------------------------------------------------

    def of_xlate(self, kernel: Kernel, dev: Device, spec: PhandleArgs) -> int:
        index = self.xlate_calls.get(dev.name, 0)
        self.xlate_calls[dev.name] = index + 1
        if kernel.mode.leaky_of_xlate_driver:
            self._alloc_priv(kernel, dev, "of_xlate", reuse=True)
        fail = self.fail_of_xlate.get((dev.name, index))
        if fail is not None:
            return fail
        return kernel.core.fwspec_add_ids(dev, [spec.args[0] if spec.args else 0])

    def probe_device(self, kernel: Kernel, dev: Device) -> IommuDevice | int:
        self.probe_calls += 1
        ref = kernel.core.fwspec_get(dev)
        if ref is None:
            return -Errno.ENODEV
        inst = kernel.core.find_instance(ref.get().iommu_fwnode)
        if inst is None or inst.ops is not self:
            return -Errno.ENODEV
        fail = self.fail_probe.get(dev.name)
        if fail is not None:
            return fail
        leaky = kernel.mode.leaky_of_xlate_driver
        self._alloc_priv(kernel, dev, "of_xlate" if leaky else "probe_device", reuse=leaky)
        return inst

    def release_device(self, kernel: Kernel, dev: Device) -> None:
        self.release_calls += 1
        yield_point(f"release_device {dev.name}", dev.key)
        if dev.iommu is None:
            return
        p = dev.iommu.get()
        if p.priv is not None:
            kernel.heap.free(p.priv)
            p.priv = None

    def probe_finalize(self, kernel: Kernel, dev: Device) -> None:
        self.finalize_calls += 1

    def device_group(self, kernel: Kernel, dev: Device) -> Group | int | None:
        if dev.name in self.null_group:
            return None
        core = kernel.core
        if self.group_policy == "singleton":
            inst = dev.iommu.get().iommu_dev if dev.iommu is not None else None
            if inst is None:
                return -Errno.ENODEV
            if inst.singleton_group is None:
                inst.singleton_group = core.group_alloc()
            return core.group_get(inst.singleton_group)
        if self.group_policy == "pci" and dev.alias_group is not None:
            for group in core.groups.values():
                if any(m.alias_group == dev.alias_group for m in group.members()):
                    return core.group_get(group)
                if any(d.alias_group == dev.alias_group and d.iommu_group is group
                       for d in kernel.all_devices()):
                    return core.group_get(group)
        return core.group_alloc()

    def def_domain_type(self, dev: Device) -> int:
        return self.def_types.get(dev.name, 0)

    # --- helpers ---------------------------------------------------------------------------

    def _alloc_priv(self, kernel: Kernel, dev: Device, where: str, *, reuse: bool) -> None:
        if dev.iommu is None:
            return
        p = dev.iommu.get()
        if reuse and p.priv is not None:
            return
        ref = kernel.heap.alloc("driver-data", DriverData(dev.name, where))
        kernel.core.priv_set(dev, ref)  # type: ignore[arg-type]
