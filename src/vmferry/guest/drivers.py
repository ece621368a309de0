"""Guest consumers of device-tree nodes that matter across a partition migration.

* :class:`VioBus` — ``arch/powerpc/platforms/pseries/vio.c``: one :class:`VioDev` per child
  of ``/vdevice`` and of the platform-facilities container (PFO family; children with an
  ``interrupt-controller`` property are skipped).  Each vio device holds a counted
  reference on its node (holder ``vio:<name>``) until it is released; the bus does not
  listen for node removal.  :meth:`VioBus.devspec` is the sysfs ``devspec`` read: the
  node's full path built by walking parents with counted ``of_get_parent``.
* The driver bound by (type, compatible) whose node changes across a migration:
  :class:`Nx842` (``ibm,compression-v1``; re-reads limits on UPDATE_PROPERTY of its node's
  name, with the upstream filter quirk as an option).
* :class:`CacheInfo` — the powerpc cacheinfo objects: references on cache nodes reached
  through ``l2-cache`` chains from every CPU node; torn down and rebuilt around the
  post-migration update.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.errors import KernelError
from vmferry.hw.devtree.tree import DeviceNode, DeviceTree, Reconfig, ReconfigEvent
from vmferry.hw.spapr.rtas import PLATFORM_FACILITIES
from vmferry.sync import yield_point

MAX_SG_LEN_CLAMP = 4096
MAX_SYNC_SIZE_CLAMP = 65536


@dataclass
class VioDev:
    name: str
    type: str
    node: DeviceNode
    family: str  # "vio" | "pfo"
    resource_id: int | None
    holder: str
    released: bool = False


class VioBus:
    """The vio bus: devices created at init for vdevice and platform-facilities children."""

    def __init__(self, tree: DeviceTree, *, unbind_on_detach: bool = False) -> None:
        """``unbind_on_detach`` (not upstream): release a device whose node is detached,
        so a real removal cannot leave the bus holding a node whose parent is freed."""
        self.tree = tree
        self.devices: dict[str, VioDev] = {}
        self.unbound: list[str] = []
        self.scan()
        if unbind_on_detach:
            tree.notifiers.append(self._on_reconfig)

    def _on_reconfig(self, event: ReconfigEvent) -> None:
        if event.action is not Reconfig.DETACH_NODE:
            return
        for name in [n for n, d in self.devices.items() if d.node.detached]:
            self.release(name)
            self.unbound.append(name)

    def scan(self) -> None:
        for parent_path, family in (("/vdevice", "vio"), (f"/{PLATFORM_FACILITIES}", "pfo")):
            parent = self.tree.find_by_path(parent_path)
            if parent is None:
                continue
            if family == "pfo" and parent.device_type("vio") != PLATFORM_FACILITIES:
                continue
            for child in parent.children():
                self._register(child, family)

    def _register(self, node: DeviceNode, family: str) -> None:
        if family == "pfo" and node.prop("interrupt-controller", "vio") is not None:
            return
        name = node.name
        if name in self.devices:
            return
        rid = node.value("ibm,resource-id", "vio")
        holder = f"vio:{name}"
        self.tree.get(node, holder)
        dtype = name if family == "pfo" else (node.device_type("vio") or name)
        self.devices[name] = VioDev(name, dtype, node, family,
                                    int.from_bytes(rid[:4], "big") if rid else None, holder)

    def devspec(self, name: str, holder: str = "user:devspec") -> str:
        """``/sys/bus/vio/devices/<name>/devspec``: %pOF via counted parent walks."""
        dev = self.device(name)
        parts: list[str] = []
        node: DeviceNode | None = self.tree.get(dev.node, holder)
        while node is not None:
            yield_point(f"devspec walk {node.name}", node, write=False)
            node.check_alive(holder)
            parent = self.tree.get_parent(node, holder)
            if parent is not None:
                parts.append(node.name)
            self.tree.put(node, holder)
            node = parent
        return "/" + "/".join(reversed(parts))

    def device(self, name: str) -> VioDev:
        dev = self.devices.get(name)
        if dev is None or dev.released:
            raise KernelError(19, f"no vio device {name!r}")
        return dev

    def release(self, name: str) -> None:
        dev = self.device(name)
        dev.released = True
        self.tree.put(dev.node, dev.holder)
        del self.devices[name]


@dataclass(frozen=True)
class NxLimits:
    status_ok: bool
    max_sg_len: int
    max_sync_size: int
    max_sync_sg: int


DISABLED = NxLimits(False, 0, 0, 0)


def nx842_limits(status: bytes | None, sg_len: bytes | None, sync_cop: bytes | None) -> NxLimits:
    """``nx842_OF_upd`` validation; any failure yields the disabled (all-zero) limits."""
    if status is None or sg_len is None or sync_cop is None:
        return DISABLED
    if status.rstrip(b"\0") != b"okay" or len(sg_len) != 4 or len(sync_cop) != 24:
        return DISABLED
    cells = [int.from_bytes(sync_cop[i:i + 4], "big") for i in range(0, 24, 4)]
    comp_count, comp_len, comp_sg, dec_count, dec_len, dec_sg = cells
    if comp_count != 1 or dec_count != 1:
        return DISABLED
    size = min(min(comp_len, dec_len), MAX_SYNC_SIZE_CLAMP)
    sg = min(comp_sg, dec_sg)
    if size < 4096 or sg < 1:
        return DISABLED
    return NxLimits(True, min(int.from_bytes(sg_len, "big"), MAX_SG_LEN_CLAMP), size, sg)


class Nx842:
    """``nx-compress-pseries``: uncounted ``of_node`` (relies on the vio reference)."""

    WATCHED = ("status", "ibm,max-sg-len", "ibm,max-sync-cop")

    def __init__(self, bus: VioBus, *, filter_quirk: bool = False) -> None:
        self.tree = bus.tree
        self.dev = bus.device("ibm,compression-v1")
        self.filter_quirk = filter_quirk
        self.limits = self._read(self.dev.node)
        self.notifications = 0
        self.ops: list[tuple[float, NxLimits]] = []
        self.tree.notifiers.append(self.on_reconfig)

    def _read(self, node: DeviceNode) -> NxLimits:
        h = "nx842"
        return nx842_limits(node.value("status", h), node.value("ibm,max-sg-len", h),
                            node.value("ibm,max-sync-cop", h))

    def on_reconfig(self, event: ReconfigEvent) -> None:
        if event.action is not Reconfig.UPDATE_PROPERTY:
            return
        if event.path.rsplit("/", 1)[-1] != self.dev.node.name:
            return
        self.notifications += 1
        assert event.prop is not None
        if self.filter_quirk and event.prop.value:
            # upstream: the OR of three length-bounded compares is true for any non-empty
            # value, and that branch republishes the old limits
            return
        self.limits = self._read(self.dev.node)

    def compress(self, now: float) -> NxLimits:
        """An H_COP operation: uses whatever limits the driver holds now."""
        yield_point("nx842 op", self.dev.node, write=False)
        self.dev.node.check_alive("nx842")
        self.ops.append((now, self.limits))
        return self.limits


class CacheInfo:
    """Cache objects referencing cache nodes (holder ``cacheinfo``)."""

    HOLDER = "cacheinfo"

    def __init__(self, tree: DeviceTree) -> None:
        self.tree = tree
        self.held: list[DeviceNode] = []
        self.rebuild()

    def rebuild(self) -> None:
        cpus = self.tree.find_by_path("/cpus")
        seen: set[int] = set()
        for cpu in [] if cpus is None else list(cpus.children()):
            if cpu.device_type(self.HOLDER) != "cpu":
                continue
            ph = cpu.value("l2-cache", self.HOLDER)
            while ph is not None and len(ph) == 4:
                num = int.from_bytes(ph, "big")
                if num in seen:
                    break
                node = self.tree.find_by_phandle(num, self.HOLDER)
                if node is None:
                    break
                seen.add(num)
                self.held.append(node)
                ph = node.value("l2-cache", self.HOLDER)

    def teardown(self) -> None:
        for node in self.held:
            self.tree.put(node, self.HOLDER)
        self.held.clear()

    def stale(self) -> list[DeviceNode]:
        """Held nodes that are no longer in the tree (invariant 8)."""
        return [n for n in self.held if n.detached]
