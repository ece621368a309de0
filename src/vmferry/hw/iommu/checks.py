"""The probe model's invariants (docs/models/iommu-probe.md §11.4), checked after scheduler steps
and at the end.

Invariants 2, 4, 6, 7 and 8 are checked where the event happens (core, OF glue, driver
core) through :meth:`Kernel.violate`; 5 is every hazard the heap and locks raise.  This
module checks the state-based ones: 1 and 3 between steps, 9 at quiescence.
"""

from __future__ import annotations

from vmferry.errors import RefcountLeak
from vmferry.hw.iommu.core import Device
from vmferry.hw.iommu.errors import MemoryLeak
from vmferry.hw.iommu.heap import Ref
from vmferry.hw.iommu.kernel import Kernel


def check_step(kernel: Kernel) -> None:
    """Invariants 1 and 3 for every device no thread is probing right now."""
    grouped, dev_iommu = 1 in kernel.checking, 3 in kernel.checking
    if not (grouped or dev_iommu):
        return
    probing, initialising = kernel.core.probing, kernel.core.initialising
    for bus in kernel.buses.values():
        for dev in bus.devices:
            if dev.name in probing or dev.name in initialising:
                continue
            if grouped and dev.iommu_group is not None:  # else invariant 1 holds
                _check_grouped(kernel, dev)
            if dev_iommu and dev.iommu is not None:  # else invariant 3 holds
                _check_dev_iommu(kernel, dev)


def _check_grouped(kernel: Kernel, dev: Device) -> None:
    group = dev.iommu_group
    if group is None:
        return
    live = dev.iommu is not None and not dev.iommu.freed
    if not live or dev.iommu is None or dev.iommu.get().iommu_dev is None:
        kernel.violate(1, f"{dev.name} is in group {group.id} without a live probed dev_iommu")
        return
    count = 0
    for member in group.devices:
        if member.dev is dev:
            count += 1
    if count != 1:
        kernel.violate(1, f"{dev.name} appears {count} times in group {group.id}")


def _check_dev_iommu(kernel: Kernel, dev: Device) -> None:
    if dev.iommu is None or dev.iommu.freed or dev.name in kernel.of.off_path:
        return
    p = dev.iommu.get()
    if p.iommu_dev is None or dev.iommu_group is None:
        kernel.violate(3, f"{dev.name} has a dev_iommu outside any probe or configure")


def check_quiescent(kernel: Kernel) -> None:
    """Invariant 9: no leaked heap objects; group refcounts match their holders."""
    if 9 not in kernel.checking:
        return
    leaked = leaked_objects(kernel)
    if leaked:
        kinds = ", ".join(sorted({r.kind for r in leaked}))
        raise MemoryLeak(f"invariant 9: {len(leaked)} leaked heap object(s): {kinds}")
    for group in list(kernel.core.groups.values()):
        holders = sum(1 for d in kernel.all_devices() if d.iommu_group is group)
        holders += sum(1 for i in kernel.core.device_list if i.singleton_group is group)
        if group.refcount != holders:
            raise RefcountLeak(
                f"invariant 9: group {group.id} refcount {group.refcount} != {holders} holders"
            )


def leaked_objects(kernel: Kernel) -> list[Ref[object]]:
    """Live heap objects not reachable from any device on a bus."""
    reachable: set[int] = set()
    for dev in kernel.all_devices():
        if dev.iommu is None or dev.iommu.freed:
            continue
        reachable.add(dev.iommu.serial)
        p = dev.iommu.get()
        for ref in (p.fwspec, p.priv):
            if ref is not None:
                reachable.add(ref.serial)
    return [r for r in kernel.heap if r.serial not in reachable]
