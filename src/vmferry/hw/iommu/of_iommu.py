"""DT side of the probe: ``of_iommu_configure``, ``of_iommu_xlate`` and
``of_dma_configure_id`` (drivers/iommu/of_iommu.c, drivers/of/device.c; docs/models/iommu-probe.md
§4.1-§4.2).

Return contract of :meth:`OfIommu.configure` (v6.8+): 0 = an IOMMU was configured, -ENODEV
= not behind any IOMMU, -EPROBE_DEFER = try again later, other negative = fatal.

Cleanup rule of the v6.15 design: on error undo exactly what this call did -- only the
fwspec when ``dev.iommu`` existed on entry (the core's own probe is running), the whole
``dev_iommu`` otherwise.  ``cleanup_overreach`` / ``cleanup_underreach`` break it either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmferry.hw.iommu.core import Device
from vmferry.hw.iommu.dt import DtNode, PhandleArgs, map_id, parse_phandle_with_args
from vmferry.hw.iommu.errors import Errno
from vmferry.hw.iommu.fwspec import IOMMU_FWSPEC_PCI_RC_ATS, Fwspec
from vmferry.hw.iommu.heap import Ref
from vmferry.hw.iommu.modes import ProbeMode
from vmferry.sync import Accesses, yield_point

if TYPE_CHECKING:
    from vmferry.hw.iommu.kernel import Kernel


class OfIommu:
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        #: devices inside an off-path configure (between parsing and the replay), by name
        self.off_path: set[str] = set()
        #: the IDs configure read back after parsing, per device (check 48)
        self.parsed_ids: dict[str, list[int]] = {}

    @property
    def mode(self) -> ProbeMode:
        return self.k.mode

    # --- of_iommu_configure ------------------------------------------------------------

    def configure(self, dev: Device, master_np: DtNode | None, id: int | None = None) -> int:
        """``of_iommu_configure(dev, master_np, id)`` (docs/models/iommu-probe.md §4.1 steps
        1-9)."""
        if master_np is None:
            return -Errno.ENODEV
        core = self.k.core
        locked = not self.mode.of_configure_unlocked
        if locked:
            core.probe_lock.acquire()
        if core.fwspec_get(dev) is not None:
            if locked:
                core.probe_lock.release()
            return 0
        yield_point(f"test {dev.name}.iommu", dev.key, write=False)
        present = dev.iommu is not None
        if not present:
            self.off_path.add(dev.name)
        try:
            err = self._parse(dev, master_np, id)
            if err:
                self._cleanup(dev, present)
                self._check_cleanup(dev, present)
            if locked:
                core.probe_lock.release()
            if not err and dev.bus is not None and self._wants_replay(dev, present):
                err = core.probe_device(dev)
        finally:
            self.off_path.discard(dev.name)
        return err

    def _wants_replay(self, dev: Device, present: bool) -> bool:
        if self.mode.legacy_flow:
            yield_point(f"test {dev.name}.iommu_group", dev.key, write=False)
            return dev.iommu_group is None
        return not present

    def _parse(self, dev: Device, np: DtNode, id: int | None) -> int:
        if dev.pci_rid is not None:
            return self._parse_pci(dev, np)
        if id is not None:
            spec = map_id(np, id)
            return spec if isinstance(spec, int) else self.xlate(dev, spec)
        return self._parse_iommus(dev, np)

    def _parse_iommus(self, dev: Device, np: DtNode) -> int:
        err = -Errno.ENODEV
        cached: Ref[Fwspec] | None = None
        index = 0
        while True:
            spec = parse_phandle_with_args(np, "iommus", "#iommu-cells", index)
            if isinstance(spec, int):
                break
            err = self.xlate(dev, spec)
            if err:
                return err
            if cached is None:
                cached = self.k.core.fwspec_get(dev)
            index += 1
        if not err:
            self._read_back(dev, cached)
        return err

    def _read_back(self, dev: Device, cached: Ref[Fwspec] | None) -> None:
        """Read the finished fwspec (the v6.6 code re-read it: it may have moved)."""
        ref = cached if self.mode.cache_fwspec_ptr else self.k.core.fwspec_get(dev)
        yield_point(f"read fwspec ids {dev.name}", dev.key, write=False)
        if ref is not None:
            self.parsed_ids[dev.name] = list(ref.get().ids)

    def _parse_pci(self, dev: Device, bridge: DtNode) -> int:
        assert dev.pci_rid is not None
        err = -Errno.ENODEV
        for rid in (dev.pci_rid, *dev.dma_aliases):
            spec = map_id(bridge, rid)
            err = spec if isinstance(spec, int) else self.xlate(dev, spec)
            if err:
                return err
        fwspec = self.k.core.fwspec_get(dev)
        if fwspec is not None and bridge.props.get("ats-supported"):
            fwspec.get().flags |= IOMMU_FWSPEC_PCI_RC_ATS
        self._read_back(dev, fwspec)
        return err

    def _cleanup(self, dev: Device, present: bool) -> None:
        core = self.k.core
        if self.mode.cleanup_overreach:
            if dev.iommu is not None:
                core.dev_iommu_free(dev)
        elif self.mode.cleanup_underreach or present:
            core.fwspec_free(dev)
        elif dev.iommu is not None:
            core.dev_iommu_free(dev)

    def _check_cleanup(self, dev: Device, present: bool) -> None:
        """Invariant 6: after an error no fwspec, and no dev_iommu this call created."""
        if dev.iommu is not None and not dev.iommu.freed:
            p = dev.iommu.get()
            if p.fwspec is not None:
                self.k.violate(6, f"configure of {dev.name} failed but left a fwspec")
            elif not present:
                self.k.violate(6, f"configure of {dev.name} failed but left an empty dev_iommu")

    # --- of_iommu_xlate ------------------------------------------------------------------

    def xlate(self, dev: Device, spec: PhandleArgs) -> int:
        """``of_iommu_xlate``: availability, fwspec_init, then the driver's of_xlate."""
        yield_point(f"of_iommu_xlate {dev.name} -> {spec.np.name}", dev.key, write=False)
        if not spec.np.available:
            return -Errno.ENODEV
        err = self.k.core.fwspec_init(dev, spec.np)
        if err:
            return err
        inst = self.k.core.find_instance(spec.np)
        ops = inst.ops if inst is not None else None
        if ops is None or not ops.has_of_xlate:
            return -Errno.ENODEV
        if ops.owner is not None and not ops.owner.try_get():
            return -Errno.ENODEV
        ret = ops.of_xlate(self.k, dev, spec)
        if ops.owner is not None:
            ops.owner.put()
        return ret

    # --- of_dma_configure_id -------------------------------------------------------------

    def dma_configure_id(
        self, dev: Device, np: DtNode | None, *, force_dma: bool, id: int | None = None
    ) -> int:
        """Range map, then ``of_iommu_configure``; only -EPROBE_DEFER is passed on."""
        installed = False
        yield_point(f"dma range map {dev.name}", dev.key)
        if dev.dma_range_map is None and np is not None:
            dev.dma_range_map = np.props.get("dma-ranges", "identity")
            installed = True
        ret = self.configure(dev, np, id)
        if ret == -Errno.EPROBE_DEFER:
            if installed:
                dev.dma_range_map = None
            return ret
        self.arch_setup_dma_ops(dev)
        return 0

    def arch_setup_dma_ops(self, dev: Device) -> None:
        """iommu-dma only when the device's group already has a translating domain."""
        yield_point(f"arch_setup_dma_ops {dev.name}", dev.key)
        group = dev.iommu_group
        if group is not None:
            yield_point(f"read group {group.id} domain for {dev.name}",
                        Accesses(reads=(group.key,), writes=(dev.key,)))
            if group.domain is not None:
                self.k.core.setup_dma_ops(dev)
                return
        dev.dma_ops = "direct"
