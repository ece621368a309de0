"""The IOMMU core's device probe (drivers/iommu/iommu.c as of v6.15 + 6.15.1,
docs/models/iommu-probe.md §2-§7).

Theory of operation
-------------------
Two entry points reach ``__iommu_probe_device`` concurrently: the registration of an IOMMU
instance (``device_register`` -> ``bus_iommu_probe``: phase 1 probes every device of every
bus, phase 2 sets up the default domains of the groups it collected) and the client-driver
path (``really_probe`` -> bus ``dma_configure`` -> ``of_iommu_configure``, which may
*replay* the probe).  A third, the bus notifier, probes hot-added devices.

The global ``probe_lock`` (``iommu_probe_device_lock``) serialises creation, probing and
teardown of ``dev.iommu``; each group has a ``mutex``.  Lock order: probe_lock -> group
mutex.  In the v6.15 design ``init_device`` drops the probe lock around the bus
``dma_configure`` (firmware parsing from the probe path) and re-validates after re-taking
it.  Faulty modes (:mod:`vmferry.hw.iommu.modes`) switch individual pieces back to their
historical behaviour.

Every access to state another thread can see is preceded by a
:func:`vmferry.sync.yield_point` naming the device/group/instance touched, so the explorer
can interleave exactly the steps of the race tables (docs/models/iommu-probe.md §6).
Kernel paths return 0 or a negative :class:`~vmferry.hw.iommu.errors.Errno`; hazards raise.

Device states (docs/models/iommu-probe.md §5.6): S0 idle, S1 init, S2 configured,
S3 driver-probed, S4 grouped, S5 probed -- see :func:`device_state`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmferry.hw.iommu.dt import DtNode
from vmferry.hw.iommu.errors import Errno, LockdepError, NullDeref
from vmferry.hw.iommu.fwspec import DevIommu, Fwspec
from vmferry.hw.iommu.heap import Ref, deref
from vmferry.hw.iommu.objects import (
    BusAction,
    Device,
    Domain,
    DomainType,
    Group,
    GroupDevice,
    IommuDevice,
    IommuOps,
    Module,
    device_state,
)
from vmferry.sync import Accesses, ModelLock, current_thread, yield_point

if TYPE_CHECKING:
    from vmferry.hw.iommu.driver_core import Bus
    from vmferry.hw.iommu.kernel import Kernel

__all__ = [
    "LATE_PROBE_WARNING",
    "NOTIFY_DONE",
    "NOTIFY_OK",
    "NULL_GROUP_WARNING",
    "RESIDUAL_BIND_WARNING",
    "BusAction",
    "DevIommu",
    "Device",
    "Domain",
    "DomainType",
    "Group",
    "GroupDevice",
    "IommuCore",
    "IommuDevice",
    "IommuOps",
    "Module",
    "device_state",
]

LATE_PROBE_WARNING = "late IOMMU probe at driver bind"
NULL_GROUP_WARNING = "device_group returned NULL"
RESIDUAL_BIND_WARNING = "driver bound during an in-flight probe-path parse"

NOTIFY_DONE = 0
NOTIFY_OK = 1


class IommuCore:
    """Instances, fwspecs, ``dev->iommu``, groups and the probe paths."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self.mode = kernel.mode
        self.device_list: list[IommuDevice] = []
        self.probe_lock = ModelLock("iommu_probe_device_lock")
        self.groups: dict[int, Group] = {}
        #: probe_device calls per device since its last release_device (invariant 2)
        self.probe_calls: dict[str, int] = {}
        #: devices inside init_device / __probe_device, by thread (invariants 1 and 3)
        self.initialising: dict[str, str] = {}
        self.probing: dict[str, str] = {}
        #: pre-v6.8 bus->iommu_ops, used by the legacy flow when a device has no fwspec
        self.bus_ops: IommuOps | None = None

    # --- locking ---------------------------------------------------------------------------

    def _lock(self) -> None:
        self.probe_lock.acquire()

    def _unlock(self) -> None:
        self.probe_lock.release()

    def assert_probe_lock(self, what: str) -> None:
        """The model's lockdep: ``what`` requires iommu_probe_device_lock (v6.8+)."""
        if self.mode.lockdep and self.probe_lock.owner != current_thread():
            raise LockdepError(f"{what} without iommu_probe_device_lock held")

    # --- instance list ---------------------------------------------------------------------

    def find_instance(self, fwnode: DtNode | None) -> IommuDevice | None:
        """First listed instance whose fwnode is ``fwnode`` (pointer identity)."""
        yield_point("lookup iommu_device_list", "iommu_device_list", write=False)
        for inst in self.device_list:
            if inst.fwnode is fwnode:
                return inst
        return None

    def fwspec_ops(self, fwspec: Fwspec | None) -> IommuOps | None:
        """``iommu_fwspec_ops``: ops of the instance named by the fwspec (or NULL fwnode)."""
        inst = self.find_instance(fwspec.iommu_fwnode if fwspec is not None else None)
        return inst.ops if inst is not None else None

    # --- dev_iommu ---------------------------------------------------------------------

    def dev_iommu_get(self, dev: Device) -> Ref[DevIommu] | None:
        """Existing ``dev.iommu`` or a freshly allocated one (lock asserted, v6.8+)."""
        self.assert_probe_lock("dev_iommu_get")
        yield_point(f"dev_iommu_get {dev.name}", dev.key)
        if dev.iommu is not None:
            dev.iommu.get()
            return dev.iommu
        if self.k.fail_alloc("dev_iommu"):
            return None
        dev.iommu = self.k.heap.alloc("dev_iommu", DevIommu())
        return dev.iommu

    def dev_iommu_free(self, dev: Device) -> None:
        """Clear ``dev.iommu`` first, then free its fwspec and itself (never ``priv``)."""
        yield_point(f"dev_iommu_free {dev.name}", dev.key)
        ref = dev.iommu
        p = deref(ref, f"{dev.name}->iommu in dev_iommu_free")
        assert ref is not None
        dev.iommu = None
        if p.fwspec is not None:
            self.k.heap.free(p.fwspec)
            p.fwspec = None
        self.k.heap.free(ref)

    def fwspec_get(self, dev: Device) -> Ref[Fwspec] | None:
        """``dev_iommu_fwspec_get``: NULL when ``dev.iommu`` is NULL."""
        yield_point(f"fwspec_get {dev.name}", dev.key, write=False)
        if dev.iommu is None:
            return None
        return dev.iommu.get().fwspec

    def dev_iommu_ops(self, dev: Device) -> IommuOps:
        """``dev->iommu->iommu_dev->ops``: NULL dereference if either is gone."""
        yield_point(f"dev_iommu_ops {dev.name}", dev.key, write=False)
        p = deref(dev.iommu, f"{dev.name}->iommu in dev_iommu_ops")
        inst = p.iommu_dev
        if inst is None or inst.ops is None:
            raise NullDeref(f"NULL pointer dereference: {dev.name}->iommu->iommu_dev->ops")
        return inst.ops

    def priv_set(self, dev: Device, priv: Ref[object] | None) -> None:
        """``dev_iommu_priv_set`` (lockdep-asserted since v6.8)."""
        self.assert_probe_lock("dev_iommu_priv_set")
        deref(dev.iommu, f"{dev.name}->iommu in dev_iommu_priv_set").priv = priv

    # --- fwspec ------------------------------------------------------------------------

    def fwspec_init(self, dev: Device, fwnode: DtNode | None) -> int:
        """``iommu_fwspec_init`` (docs/models/iommu-probe.md §2.3, steps 1-6)."""
        inst = self.find_instance(fwnode)
        if inst is None:
            return self.k.drivers.check_state(dev)
        yield_point(f"read {inst.name}.ready", inst.key, write=False)
        if not self.mode.no_ready_flag and dev.iommu is None and not inst.ready:
            return -Errno.EPROBE_DEFER
        existing = self.fwspec_get(dev)
        if existing is not None:
            same = self.fwspec_ops(existing.get()) is inst.ops
            return 0 if same else -Errno.EINVAL
        self.assert_probe_lock("iommu_fwspec_init")
        off_path = dev.name in self.k.of.off_path
        if self.dev_iommu_get(dev) is None:
            return -Errno.ENOMEM
        # a sleeping allocation; the off-path check below reads the instance's ready flag
        yield_point(f"alloc fwspec {dev.name}", Accesses(reads=(inst.key,), writes=(dev.key,)))
        if self.k.fail_alloc("fwspec"):
            return -Errno.ENOMEM
        fwspec = self.k.heap.alloc("fwspec", Fwspec(fwnode))
        deref(dev.iommu, f"{dev.name}->iommu in dev_iommu_fwspec_set").fwspec = fwspec
        if off_path and not inst.ready:
            self.k.violate(8, f"off-path configure created a fwspec for {dev.name} while "
                              f"{inst.name} is not ready")
        return 0

    def fwspec_add_ids(self, dev: Device, ids: list[int]) -> int:
        """Append IDs; growing beyond the capacity reallocates (the old object is freed)."""
        ref = self.fwspec_get(dev)
        if ref is None:
            return -Errno.EINVAL
        self.assert_probe_lock("iommu_fwspec_add_ids")
        yield_point(f"add ids {dev.name}", dev.key)
        old = ref.get()
        count = old.num_ids + len(ids)
        if count > old.capacity:
            if self.k.fail_alloc("fwspec"):
                return -Errno.ENOMEM
            grown = Fwspec(old.iommu_fwnode, old.flags, list(old.ids), count)
            new_ref = self.k.heap.alloc("fwspec", grown)
            self.k.heap.free(ref)
            deref(dev.iommu, f"{dev.name}->iommu in fwspec realloc").fwspec = new_ref
            old = grown
        old.ids.extend(ids)
        return 0

    def fwspec_free(self, dev: Device) -> None:
        yield_point(f"fwspec_free {dev.name}", dev.key)
        if dev.iommu is None:
            return
        p = dev.iommu.get()
        if p.fwspec is not None:
            self.k.heap.free(p.fwspec)
            p.fwspec = None

    # --- probe -------------------------------------------------------------------------

    def probe_device(self, dev: Device) -> int:
        """``iommu_probe_device`` (notifier / replay entry, docs/models/iommu-probe.md §5.2 C)."""
        locked = not self.mode.probe_unlocked
        if locked:
            self._lock()
        ret = self.probe_device_locked(dev, None)
        if locked:
            self._unlock()
        if ret:
            return ret
        ops = self.dev_iommu_ops(dev)
        ops.probe_finalize(self.k, dev)
        return 0

    def probe_device_locked(self, dev: Device, group_list: list[Group] | None) -> int:
        """``__iommu_probe_device`` (docs/models/iommu-probe.md §5.2 A); the caller holds the probe
        lock."""
        if not self.mode.probe_unlocked:
            self.assert_probe_lock("__iommu_probe_device")
        # the probing table is the checks' record of who probes the device (invariant 1)
        yield_point(f"test {dev.name}.iommu_group",
                    Accesses(reads=(dev.key,), writes=(("probing", dev.name),)))
        if dev.iommu_group is not None:
            return 0
        self.probing[dev.name] = current_thread()
        try:
            ret = self.init_device(dev)
            if ret:
                return ret
            if dev.driver is not None and not self.mode.legacy_flow:
                self.k.warn(LATE_PROBE_WARNING, dev.name)
            return self._join_group(dev, group_list)
        finally:
            self.probing.pop(dev.name, None)

    def _join_group(self, dev: Device, group_list: list[Group] | None) -> int:
        group = dev.iommu_group
        assert group is not None
        gdev = GroupDevice(dev, dev.name)
        group.mutex.acquire()
        yield_point(f"add {dev.name} to group {group.id}", group.key)
        group.devices.append(gdev)
        if group.domain is None and group.default_domain is None:
            if group_list is None:
                ret = self.setup_default_domain(group, immediate=True)
                if ret:
                    return self._join_unwind(dev, group, gdev, ret)
            elif not group.queued:
                group.queued = True
                group_list.append(group)
        if group.default_domain is not None:
            self.setup_dma_ops(dev)
        group.mutex.release()
        return 0

    def _join_unwind(self, dev: Device, group: Group, gdev: GroupDevice, ret: int) -> int:
        group.devices.remove(gdev)
        self.deinit_device(dev)
        group.mutex.release()
        self.group_put(group)
        return ret

    def init_device(self, dev: Device) -> int:
        """``iommu_init_device`` (docs/models/iommu-probe.md §5.2 B): dev_iommu, parsing, driver
        probe, group."""
        if self.dev_iommu_get(dev) is None:
            return -Errno.ENOMEM
        self.initialising[dev.name] = current_thread()
        try:
            ret = self._parse_from_probe_path(dev)
            if ret:
                return ret
            return self._init_with_ops(dev)
        finally:
            self.initialising.pop(dev.name, None)

    def _parse_from_probe_path(self, dev: Device) -> int:
        """B2-B4: drop the lock around the bus dma_configure, re-check after re-locking."""
        if self.mode.legacy_flow:
            return 0
        has_fwspec = self.fwspec_get(dev) is not None
        if has_fwspec and not self.mode.relock_no_recheck:
            return 0
        yield_point(f"test {dev.name}.driver", dev.key, write=False)
        if dev.driver is not None or dev.bus is None:
            return 0
        self._unlock()
        dev.bus.dma_configure(dev)
        self._lock()
        if self.mode.relock_no_recheck:
            return 0
        yield_point(f"re-check {dev.name}", dev.key, write=False)
        if dev.iommu is None or dev.iommu_group is not None:
            return -Errno.ENODEV
        return 0

    def _resolve_ops(self, dev: Device) -> IommuOps | None:
        p = deref(dev.iommu, f"{dev.name}->iommu in iommu_init_device")
        fwspec = p.fwspec.get() if p.fwspec is not None else None
        ops = self.fwspec_ops(fwspec)
        if ops is None and fwspec is None and self.mode.legacy_flow:
            ops = self.bus_ops
        return ops

    def _init_with_ops(self, dev: Device) -> int:
        ops = self._resolve_ops(dev)
        if ops is None:
            return self._init_free(dev, -Errno.ENODEV)
        if ops.owner is not None and not ops.owner.try_get():
            return self._init_free(dev, -Errno.EINVAL)
        yield_point(f"probe_device {dev.name}", dev.key)
        result = ops.probe_device(self.k, dev)
        if isinstance(result, int):
            self._module_put(ops)
            return self._init_free(dev, result)
        self._count_probe(dev)
        deref(dev.iommu, f"{dev.name}->iommu after probe_device").iommu_dev = result
        ret = self.device_link(result, dev)
        if ret:
            return self._init_release(dev, ops, ret)
        group = ops.device_group(self.k, dev)
        if group is None or isinstance(group, int):
            if group is None:
                self.k.warn(NULL_GROUP_WARNING, dev.name)
            self.device_unlink(result, dev)
            return self._init_release(dev, ops, -Errno.EINVAL if group is None else group)
        yield_point(f"set {dev.name}.iommu_group", dev.key)
        dev.iommu_group = group
        p = deref(dev.iommu, f"{dev.name}->iommu setting group")
        p.attach_deferred = False
        return 0

    def _count_probe(self, dev: Device) -> None:
        calls = self.probe_calls.get(dev.name, 0) + 1
        self.probe_calls[dev.name] = calls
        if calls > 1:
            self.k.violate(2, f"probe_device called {calls} times for {dev.name}")

    def _init_release(self, dev: Device, ops: IommuOps, ret: int) -> int:
        self.release_driver(dev, ops)
        self._module_put(ops)
        return self._init_free(dev, ret)

    def _init_free(self, dev: Device, ret: int) -> int:
        yield_point(f"init_device unwind {dev.name}", dev.key)
        p = deref(dev.iommu, f"{dev.name}->iommu in the init_device free path")
        p.iommu_dev = None
        self.dev_iommu_free(dev)
        return ret

    def _module_put(self, ops: IommuOps) -> None:
        if ops.owner is not None:
            ops.owner.put()

    def release_driver(self, dev: Device, ops: IommuOps) -> None:
        ops.release_device(self.k, dev)
        self.probe_calls[dev.name] = max(0, self.probe_calls.get(dev.name, 0) - 1)

    # --- sysfs links ----------------------------------------------------------------------

    def device_link(self, inst: IommuDevice, dev: Device) -> int:
        yield_point(f"link {inst.name}/devices/{dev.name}", inst.key)
        if dev.name in inst.links:
            self.k.warn("sysfs: cannot create duplicate filename", f"{inst.name}/{dev.name}")
            return -Errno.EEXIST
        inst.links.add(dev.name)
        return 0

    def device_unlink(self, inst: IommuDevice, dev: Device) -> None:
        yield_point(f"unlink {inst.name}/devices/{dev.name}", inst.key)
        inst.links.discard(dev.name)

    # --- groups and domains -----------------------------------------------------------------

    def group_alloc(self) -> Group:
        gid = 0
        while gid in self.groups:
            gid += 1
        group = Group(gid, ModelLock(f"group{gid}.mutex"))
        self.groups[gid] = group
        self.k.heap_groups.add(group)
        return group

    def group_get(self, group: Group) -> Group:
        group.refcount += 1
        return group

    def group_put(self, group: Group | None) -> None:
        if group is None:
            return
        group.refcount -= 1
        if group.refcount == 0:
            if group.default_domain is not None or group.blocking_domain is not None:
                self.k.warn("group released with domains still set", str(group.id))
            group.freed = True
            self.groups.pop(group.id, None)
            self.k.heap_groups.discard(group)

    def default_domain_type(self, group: Group) -> int:
        """Combine the members' def_domain_type; a conflict logs an error, IDENTITY wins."""
        chosen = 0
        for member in group.members():
            want = self.dev_iommu_ops(member).def_domain_type(member)
            if want and chosen and want != chosen:
                self.k.log(f"iommu: group {group.id}: conflicting default domain types")
                chosen = int(DomainType.IDENTITY)
            elif want:
                chosen = want
        return chosen

    def setup_default_domain(self, group: Group, *, immediate: bool) -> int:
        """Allocate and attach the group's default domain (group mutex held)."""
        yield_point(f"setup default domain group {group.id}", group.key)
        want = self.default_domain_type(group) or int(self.k.default_domain_type)
        listed = tuple(i.key for i in self.device_list)
        members = tuple(m.key for m in group.members())
        yield_point(f"check instances ready group {group.id}",
                    Accesses(reads=("iommu_device_list", *listed, *members), writes=(group.key,)))
        domain = Domain(DomainType(want))
        group.default_domain = group.domain = domain
        group.blocking_domain = None
        group.setup_path = "immediate" if immediate else "walk"
        group.setup_while_unready = tuple(
            i.name for i in self.device_list if not i.ready and self._serves(i, group)
        )
        return 0

    def _serves(self, inst: IommuDevice, group: Group) -> bool:
        for member in group.members():
            ref = member.iommu
            if ref is not None and not ref.freed and ref.get().iommu_dev is inst:
                return True
        return False

    def setup_dma_ops(self, dev: Device) -> None:
        """``iommu_setup_dma_ops``: iommu-dma iff the group's domain translates."""
        yield_point(f"setup dma ops {dev.name}", dev.key)
        group = dev.iommu_group
        if group is not None:
            yield_point(f"read group {group.id} domain for {dev.name}",
                        Accesses(reads=(group.key,), writes=(dev.key,)))
        domain = group.domain if group is not None else None
        new = "iommu" if domain is not None and domain.type.translated else "direct"
        if dev.bound and dev.dma_ops != new:
            self._switched_under_driver(dev, new)
        dev.dma_ops = new

    def _switched_under_driver(self, dev: Device, new: str) -> None:
        message = f"{dev.name}: DMA ops switched from {dev.dma_ops} to {new} while its " \
                  f"driver is bound"
        if dev.bound_during_probe and not self.k.strict_residuals:
            # the residual window of the v6.15 design (see Kernel.strict_residuals)
            self.k.warn(RESIDUAL_BIND_WARNING, message)
            return
        self.k.violate(7, message)

    def use_default_domain(self, dev: Device) -> int:
        """``iommu_device_use_default_domain`` at driver bind (docs/models/iommu-probe.md §5.3)."""
        yield_point(f"read {dev.name}.iommu_group", dev.key, write=False)
        group = dev.iommu_group
        if group is None:
            if dev.name in self.initialising:
                dev.bound_during_probe = True  # the residual window: no claim taken
            return 0
        group.mutex.acquire()
        yield_point(f"use default domain group {group.id}", group.key)
        ret = 0
        if group.default_domain is None and not self.mode.no_default_domain_gate:
            ret = -Errno.EPROBE_DEFER
        elif group.owner is not None or (group.domain is not group.default_domain):
            ret = -Errno.EBUSY
        else:
            group.owner_cnt += 1
        group.mutex.release()
        return ret

    def unuse_default_domain(self, dev: Device) -> None:
        group = dev.iommu_group
        if group is None:
            return
        group.mutex.acquire()
        yield_point(f"unuse default domain group {group.id}", group.key)
        if group.owner_cnt > 0:
            group.owner_cnt -= 1
        group.mutex.release()

    # --- registration and the bus walk -------------------------------------------------------

    def device_register(self, inst: IommuDevice, ops: IommuOps, hwnode: DtNode | None) -> int:
        """``iommu_device_register`` (docs/models/iommu-probe.md §5.1): list, walk every bus, then
        ready."""
        if ops.in_module and ops.owner is None:
            self.k.warn("iommu ops in a module without owner", inst.name)
            return -Errno.EINVAL
        inst.ops, inst.fwnode = ops, hwnode
        yield_point(f"list {inst.name}", "iommu_device_list")
        self.device_list.append(inst)
        inst.listed = True
        if self.mode.legacy_flow and self.bus_ops is None:
            self.bus_ops = ops
        ret = 0
        for bus in self.k.buses.values():
            ret = self.bus_iommu_probe(bus)
            if ret:
                break
        if ret:
            self.k.log(f"{inst.name}: Failed to register iommu {ret}")
            self.device_unregister(inst)
            return ret
        yield_point(f"set {inst.name}.ready", inst.key)
        inst.ready = True
        return 0

    def bus_iommu_probe(self, bus: Bus) -> int:
        group_list: list[Group] = []
        for dev in list(bus.devices):
            locked = not self.mode.probe_unlocked
            if locked:
                self._lock()
            ret = self.probe_device_locked(dev, group_list)
            if locked:
                self._unlock()
            if ret == -Errno.ENODEV:
                ret = 0
            if ret:
                return ret
        for group in group_list:
            ret = self._walk_phase2(group)
            if ret:
                return ret
        return 0

    def _walk_phase2(self, group: Group) -> int:
        group.mutex.acquire()
        yield_point(f"phase 2 group {group.id}", group.key)
        group.queued = False
        ret = 0
        if group.default_domain is None:
            ret = self.setup_default_domain(group, immediate=False)
        if ret:
            group.mutex.release()
            return ret
        members = group.members()
        for member in members:
            self.setup_dma_ops(member)
        group.mutex.release()
        for member in members:
            self.dev_iommu_ops(member).probe_finalize(self.k, member)
        return 0

    def device_unregister(self, inst: IommuDevice) -> None:
        """Release every device probed by ``inst``, then unlist it, then put the singleton."""
        for bus in self.k.buses.values():
            for dev in list(bus.devices):
                yield_point(f"unregister: test {dev.name}", dev.key, write=False)
                p = dev.iommu.get() if dev.iommu is not None else None
                if p is not None and p.iommu_dev is inst:
                    self.release_device(dev)
        yield_point(f"unlist {inst.name}", "iommu_device_list")
        if inst in self.device_list:
            self.device_list.remove(inst)
        inst.listed = inst.ready = False
        single, inst.singleton_group = inst.singleton_group, None
        self.group_put(single)

    # --- removal ---------------------------------------------------------------------------

    def release_device(self, dev: Device) -> None:
        """``iommu_release_device`` (BUS_NOTIFY_REMOVED_DEVICE, unregister;
        docs/models/iommu-probe.md §5.5)."""
        yield_point(f"release {dev.name}", dev.key)
        group = dev.iommu_group
        if group is not None:
            group.mutex.acquire()
            gdev = next((g for g in group.devices if g.dev is dev), None)
            if gdev is not None:
                group.devices.remove(gdev)
            if dev.iommu is not None and not dev.iommu.freed and dev.iommu.get().iommu_dev:
                self.deinit_device(dev)
            else:
                dev.iommu_group = None
            group.mutex.release()
            self.group_put(group)
        if dev.iommu is not None:
            self.dev_iommu_free(dev)

    def deinit_device(self, dev: Device) -> None:
        """``iommu_deinit_device`` (group mutex held)."""
        p = deref(dev.iommu, f"{dev.name}->iommu in iommu_deinit_device")
        inst = p.iommu_dev
        group = dev.iommu_group
        if inst is not None and inst.ops is not None:
            self.device_unlink(inst, dev)
            self.release_driver(dev, inst.ops)
        if group is not None and not group.devices:
            group.default_domain = group.blocking_domain = group.domain = None
        dev.iommu_group = None
        if inst is not None and inst.ops is not None:
            self._module_put(inst.ops)
        p.iommu_dev = None
        self.dev_iommu_free(dev)

    def bus_notifier(self, action: BusAction, dev: Device) -> int:
        """``iommu_bus_notifier``: probe on ADD_DEVICE, release on REMOVED_DEVICE."""
        if action is BusAction.ADD_DEVICE:
            return NOTIFY_DONE if self.probe_device(dev) else NOTIFY_OK
        if action is BusAction.REMOVED_DEVICE:
            self.release_device(dev)
            return NOTIFY_OK
        return NOTIFY_DONE
