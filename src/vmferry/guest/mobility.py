"""The pseries guest's post-migration device-tree update (``mobility.c`` + ``dlpar.c``).

Theory of operation
-------------------
After ``ibm,suspend-me`` returns on the destination, :meth:`MobilityHandler.post_mobility_fixup`
runs, in this order: activate-firmware, cpus_read_lock, cacheinfo teardown, the
update-nodes walk (:meth:`MobilityHandler.devicetree_update`), cacheinfo rebuild,
cpus_read_unlock, mitigations, 24x7.  The walk asks firmware for pages of
(opcode, count, operands) records and, per phandle, looks the node up (counted) and
deletes it (``dlpar_detach_node``), updates it (``ibm,update-properties`` pages) or adds
a subtree below it (``ibm,configure-connector``), then drops the lookup reference.

Every questionable upstream behaviour (docs/models/pseries-mobility.md §12.3) is a named switch on
:class:`MobilityOptions`; :data:`MODES` groups them:

``correct``     (default) platform-facilities delete/add ignored by device_type (the seed
                patch); whole cc subtrees attached through a changeset; busy/extended
                delay retried; ADD pairs always consumed; work areas bounds-checked and
                parsed whole before any change; partial values name-checked; user space
                held until the update is applied.
``upstream``    newest kernel as read: filter on, but single-node attach, no busy retry
                in update-nodes, drc word skipped on a failed ADD lookup, no bounds check,
                no partial-name check, user space running from resume.
``no_pf_skip``  ``upstream`` without the seed patch: the 2021 use-after-free and the lost
                children.
``misaligned_add`` / ``busy_abort``  ``correct`` with one upstream quirk switched back on.

Hazards met by a faulty mode never escape :meth:`post_mobility_fixup`: the tree runs in
observe mode, and whatever is detected is listed in the :class:`MobilityReport`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

from vmferry.errors import HazardError, InvariantViolation, ModelError
from vmferry.guest.drivers import CacheInfo
from vmferry.hw.devtree.tree import (
    Changeset,
    DeviceNode,
    DeviceTree,
    HazardRecord,
    LeakRecord,
    Property,
    Reconfig,
    ReconfigEvent,
)
from vmferry.hw.spapr.rtas import (
    CC_DATA_OFFSET,
    MIGRATION_SCOPE,
    NODE_COUNT_MASK,
    PLATFORM_FACILITIES,
    UPDATE_NODES_HEADER,
    UPDATE_PROPS_HEADER,
    VD_DELETE,
    WORK_AREA_SIZE,
    Cc,
    NodeOp,
    Rc,
    WorkArea,
    WorkAreaError,
    WorkAreaOverrun,
    extended_delay_s,
    is_extended_delay,
    read_extended,
)
from vmferry.sync import ModelLock, yield_point

HOLDER = "lookup:mobility"


class OutOfBoundsRead(HazardError):
    """Parsing without bounds checks read beyond the 4096-byte work area."""

    hazard = "out-of-bounds-read"


class NullDereference(HazardError):
    """The kernel cc client dereferenced a NULL ``last`` node."""

    hazard = "null-dereference"


class SharedBufferCorruption(HazardError):
    """Another caller's data came back through the global RTAS buffer."""

    hazard = "shared-buffer-corruption"


class RtasDataBuf:
    """The kernel's global ``rtas_data_buf`` and its lock (``mobility_rtas_call``).

    Each call copies the caller's private 4 KiB work area in, calls RTAS on the global
    buffer and copies the result back.  ``locked=False`` reproduces callers that skip
    ``rtas_data_buf_lock``.
    """

    def __init__(self, *, locked: bool = True) -> None:
        self.buf = bytearray(WORK_AREA_SIZE)
        self.lock = ModelLock("rtas_data_buf_lock")
        self.locked = locked

    def call(self, fn: Callable[[bytearray], int], private: bytearray) -> int:
        if self.locked:
            self.lock.acquire()
        try:
            yield_point("rtas_data_buf copy in", self, write=True)
            self.buf[:] = private
            yield_point("rtas call on rtas_data_buf", self, write=True)
            rc = fn(self.buf)
            yield_point("rtas_data_buf copy out", self, write=False)
            private[:] = self.buf
            return rc
        finally:
            if self.locked:
                self.lock.release()


class CcProtocolError(ModelError):
    """configure-connector responses out of order (correct client)."""


class PartialPropertyError(WorkAreaError):
    """A split property value was interrupted (another name, or end of stream)."""


class RtasInterface(Protocol):
    """What the guest calls: implemented by :class:`vmferry.hw.spapr.rtas.RtasFirmware`."""

    def update_nodes(self, buf: bytearray, scope: int) -> int: ...
    def update_properties(self, buf: bytearray, scope: int) -> int: ...
    def configure_connector(self, buf: bytearray, extent: bytearray | None = None) -> int: ...
    def activate_firmware(self) -> int: ...


class VirtualClock(Protocol):
    """A clock the model can advance (``vmferry.clock.ManualClock``)."""

    def monotonic(self) -> float: ...
    def advance(self, seconds: float) -> None: ...


class UserSpace(enum.Enum):
    IMMEDIATE = "immediate"  # upstream: user space runs as soon as stop_machine returns
    HELD = "held"  # frozen until the device-tree update is applied


@dataclass(frozen=True)
class MobilityOptions:
    platfac_filter: bool = True
    attach_whole_subtree: bool = True
    cc_client: str = "correct"  # "correct" | "kernel" (newest) | "legacy" (2018-2021)
    skip_drc_on_failed_lookup: bool = True
    retry_busy: bool = True
    bounds_check: bool = True
    partial_name_check: bool = True
    user_space: UserSpace = UserSpace.HELD
    cacheinfo_teardown: bool = True
    legacy_attach_put_parent: bool = False
    missing_token_is_error: bool = False  # pre-v5.11
    merge_readd: bool = False  # target design: delete+add of a phandle becomes updates
    cpus_read_lock: bool = True  # hold cpu hotplug off during the update (2019)
    rtas_call_s: float = 0.0002  # virtual time one RTAS call takes
    max_retries: int = 64


MODES: dict[str, MobilityOptions] = {}
MODES["correct"] = MobilityOptions()
MODES["upstream"] = MobilityOptions(
    attach_whole_subtree=False, cc_client="kernel", skip_drc_on_failed_lookup=False,
    retry_busy=False, bounds_check=False, partial_name_check=False,
    user_space=UserSpace.IMMEDIATE)
MODES["no_pf_skip"] = replace(MODES["upstream"], platfac_filter=False)
MODES["misaligned_add"] = replace(MODES["correct"], skip_drc_on_failed_lookup=False)
MODES["busy_abort"] = replace(MODES["correct"], retry_busy=False)
MODES["merge_readd"] = replace(MODES["correct"], merge_readd=True)


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # delete-node | add-node | update-property | remove-property | ignored-*
    path: str
    prop: str = ""


@dataclass(frozen=True, slots=True)
class Action:
    op: NodeOp | int
    phandle: int
    drc_index: int | None = None
    offset: int = 0


@dataclass
class MobilityReport:
    rc: int = 0
    actions: list[Action] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: the typed errors behind ``errors`` (malformed work areas, cc protocol violations)
    rejections: list[ModelError] = field(default_factory=list)
    hazards: list[HazardRecord] = field(default_factory=list)
    leaks: list[LeakRecord] = field(default_factory=list)
    leaked_partials: int = 0
    trace: list[str] = field(default_factory=list)
    resumed_at: float = 0.0
    user_space_at: float = 0.0
    updated_at: float = 0.0
    user_space_runs: int = 0
    stale_user_runs: int = 0

    @property
    def exposure_window_s(self) -> float:
        """Time user space ran against the stale (pre-update) tree."""
        return max(0.0, self.updated_at - self.user_space_at)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.hazards and not self.errors and not self.leaks


@dataclass
class _Pending:
    name: str
    value: bytearray


class MobilityHandler:
    """The guest's mobility code bound to one tree, one RTAS and one clock."""

    def __init__(self, tree: DeviceTree, rtas: RtasInterface, clock: VirtualClock,
                 options: MobilityOptions | None = None, *,
                 tokens: frozenset[str] | None = None,
                 cacheinfo: CacheInfo | None = None,
                 user_space: Callable[[], None] | None = None,
                 data_buf: RtasDataBuf | None = None) -> None:
        self.tree = tree
        self.rtas = rtas
        self.clock = clock
        self.opts = options or MobilityOptions()
        self.tokens = tokens if tokens is not None else frozenset(
            {"ibm,update-nodes", "ibm,update-properties", "ibm,configure-connector"})
        self.cacheinfo = cacheinfo
        self.user_space = user_space
        self.data_buf = data_buf
        self.cpu_hotplug = ModelLock("cpu_hotplug")
        self.updating = False  # inside the device-tree update (for cpu_offline's check)
        self.report = MobilityReport()
        # merge_readd: deletes deferred until the sequence ends (each holds a reference)
        self._deferred: dict[int, DeviceNode] = {}

    # -- top level ------------------------------------------------------------------------

    def post_mobility_fixup(self) -> MobilityReport:
        """Everything after resume; never raises a HazardError (it is reported)."""
        r = self.report
        r.resumed_at = self.clock.monotonic()
        r.user_space_at = r.resumed_at
        self._run_user_space(stale=True)
        observe, self.tree.observe = self.tree.observe, True
        hazards_before = len(self.tree.hazards)
        try:
            self._fixup_steps()
        except HazardError as exc:
            r.hazards.append(HazardRecord(exc.hazard, "", "mobility", str(exc)))
            r.rc = r.rc or -5
        finally:
            r.updated_at = self.clock.monotonic()
            if self.opts.user_space is UserSpace.HELD:
                r.user_space_at = r.updated_at
            self._run_user_space(stale=False)
            r.hazards.extend(self.tree.hazards[hazards_before:])
            self.tree.observe = observe
            r.leaks = self.tree.leak_report()
            self._check_dangling()
        return r

    def _fixup_steps(self) -> None:
        r = self.report
        r.trace.append("activate-firmware")
        self._call(self.rtas.activate_firmware)
        if self.opts.cpus_read_lock:
            self.cpu_hotplug.acquire()
        r.trace.append("cpus_read_lock")
        self.updating = True
        try:
            if self.cacheinfo is not None and self.opts.cacheinfo_teardown:
                r.trace.append("cacheinfo_teardown")
                self.cacheinfo.teardown()
            rc = self.devicetree_update(MIGRATION_SCOPE)
            if rc:
                r.warnings.append(f"device tree update failed: {rc}")
            if self.cacheinfo is not None and self.opts.cacheinfo_teardown:
                r.trace.append("cacheinfo_rebuild")
                self.cacheinfo.rebuild()
        finally:
            self.updating = False
            if self.opts.cpus_read_lock:
                self.cpu_hotplug.release()
            r.trace.append("cpus_read_unlock")
        r.trace.append("mitigations")
        r.trace.append("24x7")

    def cpu_offline(self, cpu: int) -> None:
        """A CPU hot-unplug request: takes the hotplug lock for writing."""
        with self.cpu_hotplug:
            yield_point(f"cpu {cpu} offline", "cpus", write=True)
            if self.updating:
                raise InvariantViolation(
                    f"cpu {cpu} went offline while the device-tree update was running")

    def _run_user_space(self, *, stale: bool) -> None:
        if self.user_space is None:
            return
        if stale and self.opts.user_space is UserSpace.HELD:
            return
        self.report.user_space_runs += 1
        self.report.stale_user_runs += stale
        try:
            self.user_space()
        except HazardError as exc:
            self.report.hazards.append(HazardRecord(exc.hazard, "", "user space", str(exc)))

    def _check_dangling(self) -> None:
        for node in self.tree.dangling():
            assert node.parent is not None
            self.report.hazards.append(HazardRecord(
                "dangling-parent", node.path(), ",".join(sorted(node.holders)),
                f"{node.path()!r} is still held but its parent was released"))

    # -- RTAS plumbing ----------------------------------------------------------------------

    def _call(self, fn: Callable[[], int]) -> int:
        """One RTAS call, retried on busy/extended delay when ``retry_busy``."""
        for _ in range(self.opts.max_retries):
            yield_point("rtas call", "rtas", write=True)
            self.clock.advance(self.opts.rtas_call_s)
            rc = fn()
            if rc == Rc.BUSY and self.opts.retry_busy:
                continue
            if is_extended_delay(rc) and self.opts.retry_busy:
                self.clock.advance(extended_delay_s(rc))
                continue
            return rc
        return Rc.BUSY

    # -- update-nodes ---------------------------------------------------------------------

    def devicetree_update(self, scope: int) -> int:
        if "ibm,update-nodes" not in self.tokens:
            return -22 if self.opts.missing_token_is_error else 0
        buf = bytearray(WORK_AREA_SIZE)
        while True:
            rc = self._call(lambda: self.rtas.update_nodes(buf, scope))
            self.report.trace.append("update-nodes")
            if rc not in (Rc.SUCCESS, Rc.MORE):
                self.report.rc = rc
                return rc
            try:
                self._process_page(buf)
            except WorkAreaError as exc:
                self.report.rejections.append(exc)
                self.report.errors.append(f"update-nodes: {exc}")
                self.report.rc = -22
                return -22
            if rc == Rc.SUCCESS:
                self._flush_deferred()
                return 0

    def _flush_deferred(self) -> None:
        """merge_readd: deletes no add re-created are carried out now, in order."""
        deferred, self._deferred = self._deferred, {}
        for node in deferred.values():
            if not node.detached:
                path = node.path()
                self.tree.detach_recursive(node)
                self.report.changes.append(Change("delete-node", path))
            self.tree.put(node, "mobility:deferred")

    def _process_page(self, buf: bytearray) -> None:
        wa = WorkArea(buf)
        if self.opts.skip_drc_on_failed_lookup:
            actions = list(self._walk_page(wa, lambda ph: True))  # validate whole page first
            for a in actions:
                self._do_action(a)
        else:
            for a in self._walk_page(wa, self._exists):
                self._do_action(a)

    def _exists(self, ph: int) -> bool:
        return self.tree.node_by_phandle(ph) is not None

    def _u32(self, wa: WorkArea, off: int) -> int:
        if not self.opts.bounds_check and not 0 <= off <= WORK_AREA_SIZE - 4:
            raise OutOfBoundsRead(f"update-nodes parser read beyond the work area at {off:#x}")
        return wa.u32(off)

    def _walk_page(self, wa: WorkArea, exists: Callable[[int], bool]) -> Iterator[Action]:
        off = UPDATE_NODES_HEADER
        while True:
            word = self._u32(wa, off)
            off += 4
            op, count = word >> 24, word & NODE_COUNT_MASK
            if op == NodeOp.TERMINATOR:
                return
            for _ in range(count):
                ph = self._u32(wa, off)
                at, off = off, off + 4
                if op == NodeOp.ADD and (self.opts.skip_drc_on_failed_lookup or exists(ph)):
                    drc = self._u32(wa, off)
                    off += 4
                    yield Action(NodeOp.ADD, ph, drc, at)
                elif op == NodeOp.ADD:
                    yield Action(NodeOp.ADD, ph, None, at)  # upstream: drc word not consumed
                else:
                    yield Action(NodeOp(op) if op in (1, 2) else op, ph, None, at)

    def _do_action(self, a: Action) -> None:
        self.report.actions.append(a)
        if self.opts.user_space is UserSpace.IMMEDIATE:
            self._run_user_space(stale=True)  # user space runs alongside the update
        if a.op not in (NodeOp.DELETE, NodeOp.UPDATE, NodeOp.ADD):
            self.report.warnings.append(f"unknown update-nodes opcode {int(a.op):#x} ignored")
            return
        node = self.tree.find_by_phandle(a.phandle, HOLDER)
        if node is None:
            self.report.warnings.append(
                f"Failed lookup: phandle {a.phandle:#x} for action {int(a.op):#x}")
            return
        try:
            if a.op == NodeOp.DELETE:
                self.delete_node(node)
            elif a.op == NodeOp.UPDATE:
                self.update_node(node)
            elif a.drc_index is not None:
                self.add_node(node, a.drc_index)
        finally:
            self.tree.put(node, HOLDER)

    # -- delete / update / add ------------------------------------------------------------

    def _is_platfac(self, node: DeviceNode) -> bool:
        parent = self.tree.get_parent(node, HOLDER)
        try:
            return PLATFORM_FACILITIES in (node.device_type(HOLDER),
                                           parent.device_type(HOLDER) if parent else None)
        finally:
            self.tree.put(parent, HOLDER)

    def delete_node(self, node: DeviceNode) -> None:
        path = node.path()
        if self.opts.merge_readd:
            if node.phandle not in self._deferred:
                self._deferred[node.phandle] = self.tree.get(node, "mobility:deferred") or node
            return
        if self.opts.platfac_filter and self._is_platfac(node):
            self.report.notices.append(
                f"ignoring remove operation for {path}:{node.phandle}")
            self.report.changes.append(Change("ignored-delete", path))
            return
        self.tree.detach_recursive(node)
        self.report.changes.append(Change("delete-node", path))

    def update_node(self, node: DeviceNode) -> None:
        if "ibm,update-properties" not in self.tokens:
            self.report.errors.append("ibm,update-properties missing")
            return
        buf = bytearray(WORK_AREA_SIZE)
        wa = WorkArea(buf)
        wa.set_u32(0, node.phandle)
        pending: _Pending | None = None
        while True:
            rc = self._call(lambda: self._props_call(buf))
            if rc >= 0 and wa.u32(0) != node.phandle:
                raise SharedBufferCorruption(
                    f"update-properties for {node.path()} ({node.phandle:#x}) came back "
                    f"describing phandle {wa.u32(0):#x}")
            if rc < 0:
                self.report.warnings.append(f"update-properties {node.path()}: rc {rc}")
                break
            try:
                descs = self._parse_props(wa)
            except WorkAreaError as exc:
                self.report.rejections.append(exc)
                self.report.errors.append(f"update-properties {node.path()}: {exc}")
                return
            pending = self._apply_descs(node, descs, pending)
            if rc != Rc.MORE:
                break
        if pending is not None:
            self._abandon_partial(node, pending)

    def _props_call(self, buf: bytearray) -> int:
        def call(b: bytearray) -> int:
            return self.rtas.update_properties(b, MIGRATION_SCOPE)
        return call(buf) if self.data_buf is None else self.data_buf.call(call, buf)

    def _abandon_partial(self, node: DeviceNode, pending: _Pending) -> None:
        if self.opts.partial_name_check:
            self.report.errors.append(
                f"{node.path()}: stream ended inside split value of {pending.name!r}; dropped")
        else:
            self.report.leaked_partials += 1

    def _parse_props(self, wa: WorkArea) -> list[tuple[str, int, bytes]]:
        """One page of descriptors (path descriptor skipped), parsed whole or rejected."""
        n = self._u32(wa, 16)
        off = UPDATE_PROPS_HEADER
        out: list[tuple[str, int, bytes]] = []
        for _ in range(n):
            if self._byte(wa, off) == 0 and not out:
                vd = self._u32(wa, off + 1)
                self._check_span(off + 5, vd)
                off += 5 + vd
                continue
            name = self._cstr(wa, off)
            off += len(name) + 1
            vd = self._u32(wa, off)
            off += 4
            length = 0 if vd in (0, VD_DELETE) else (
                (-vd) & 0xFFFFFFFF if vd & 0x80000000 else vd)
            self._check_span(off, length)
            out.append((name, vd, bytes(wa.buf[off:off + length])))
            off += length
        return out

    def _byte(self, wa: WorkArea, off: int) -> int:
        self._check_span(off, 1)
        return wa.buf[off]

    def _cstr(self, wa: WorkArea, off: int) -> str:
        if not self.opts.bounds_check:
            self._check_span(off, 1)
            end = wa.buf.find(b"\0", off)
            if end < 0:
                raise OutOfBoundsRead(f"property name runs past the work area at {off:#x}")
            return wa.buf[off:end].decode("latin-1")
        return wa.cstr(off)

    def _check_span(self, off: int, n: int) -> None:
        if off < 0 or off + n > WORK_AREA_SIZE:
            if self.opts.bounds_check:
                raise WorkAreaOverrun(f"descriptor of {n} bytes crosses the work area end",
                                      off)
            raise OutOfBoundsRead(f"update-properties parser read {n} bytes at {off:#x}, "
                                  "beyond the 4096-byte work area")

    def _apply_descs(self, node: DeviceNode, descs: list[tuple[str, int, bytes]],
                     pending: _Pending | None) -> _Pending | None:
        for name, vd, value in descs:
            if vd == 0:
                continue
            if vd == VD_DELETE:
                pending = None
                if node.prop(name, HOLDER) is not None:
                    self.tree.remove_property(node, name)
                    self.report.changes.append(Change("remove-property", node.path(), name))
                continue
            pending = self._update_property(node, pending, name, vd, value)
        return pending

    def _update_property(self, node: DeviceNode, pending: _Pending | None, name: str,
                         vd: int, value: bytes) -> _Pending | None:
        more = bool(vd & 0x80000000)
        if pending is not None:
            if self.opts.partial_name_check and pending.name != name:
                self.report.errors.append(
                    f"{node.path()}: chunk for {name!r} while {pending.name!r} was pending;"
                    " both dropped")
                return None
            pending.value += value
        else:
            pending = _Pending(name, bytearray(value))
        if more:
            return pending
        self.tree.update_property(node, Property(pending.name, bytes(pending.value)))
        self.report.changes.append(Change("update-property", node.path(), pending.name))
        return None

    def add_node(self, parent: DeviceNode, drc_index: int) -> None:
        top = self.configure_connector(drc_index, parent)
        if top is None:
            self.report.warnings.append(f"configure-connector {drc_index:#x} failed")
            return
        if self.opts.merge_readd:
            if not self._merge(top, parent):
                self._attach(top, parent)  # a genuinely new subtree, facilities included
            return
        if self.opts.platfac_filter and top.device_type(HOLDER) == PLATFORM_FACILITIES:
            self.report.notices.append(
                f"ignoring add operation for {_join(parent, top)}")
            self.report.changes.append(Change("ignored-add", _join(parent, top)))
            self.tree.free_unlinked(top)
            return
        self._attach(top, parent)

    def _merge(self, top: DeviceNode, parent: DeviceNode) -> bool:
        """Turn a re-added subtree whose nodes were just deleted into property updates."""
        live = self._deferred.get(_cc_phandle(top))
        if live is None or live.parent is not parent:
            return False
        self._merge_node(top, live)
        return True

    def _merge_node(self, cc: DeviceNode, live: DeviceNode) -> None:
        del self._deferred[live.phandle]
        self.tree.put(live, "mobility:deferred")
        wanted = {p.name: p for p in cc.properties(HOLDER)}
        for p in wanted.values():
            if live.value(p.name, HOLDER) != p.value:
                self.tree.update_property(live, p)
                self.report.changes.append(Change("update-property", live.path(), p.name))
        for p in live.properties(HOLDER):
            if p.name not in wanted:
                self.tree.remove_property(live, p.name)
                self.report.changes.append(Change("remove-property", live.path(), p.name))
        c = cc.child
        while c is not None:
            nxt = c.sibling
            match = self._deferred.get(_cc_phandle(c))
            if match is not None and match.parent is live:
                self._merge_node(c, match)
            else:
                c.sibling = None
                c.parent = live
                self._attach(c, live)
            c = nxt
        cc.child = cc.sibling = None
        self.tree.free_unlinked(cc)

    def _attach(self, top: DeviceNode, parent: DeviceNode) -> None:
        base = parent.path().rstrip("/")
        if self.opts.attach_whole_subtree:
            cs = Changeset(self.tree)
            cs.attach_subtree(top, parent)
            names = [e.node for e in cs.entries]
            try:
                cs.apply()
            except ModelError as exc:
                self.report.errors.append(f"attach below {parent.path()}: {exc}")
                cs.destroy()
                self.tree.free_unlinked(top)
                return
            cs.destroy()
            for n in names:
                self.report.changes.append(Change("add-node", n.path()))
            return
        self.tree.attach(top, parent)
        self.report.changes.append(Change("add-node", f"{base}/{top.name}"))
        if self.opts.legacy_attach_put_parent:
            self.tree.put(parent, HOLDER)

    # -- configure-connector client ---------------------------------------------------------

    def configure_connector(self, drc_index: int, parent: DeviceNode) -> DeviceNode | None:
        """Build the unlinked subtree for ``drc_index`` (``dlpar_configure_connector``)."""
        buf = bytearray(WORK_AREA_SIZE)
        wa = WorkArea(buf)
        wa.set_u32(0, drc_index)
        st = _CcState(parent)
        try:
            return self._cc_loop(buf, wa, st)
        except (CcProtocolError, WorkAreaError) as exc:
            self.report.rejections.append(exc)
            self.report.errors.append(f"configure-connector {drc_index:#x}: {exc}")
        except NullDereference as exc:
            self.report.hazards.append(HazardRecord(exc.hazard, "", "cc-client", str(exc)))
        self.tree.free_unlinked(st.first)
        return None

    def _cc_loop(self, buf: bytearray, wa: WorkArea, st: _CcState) -> DeviceNode | None:
        extent: bytearray | None = None
        for _ in range(1_000_000):
            yield_point("configure-connector", "rtas", write=True)
            self.clock.advance(self.opts.rtas_call_s)
            rc = self.rtas.configure_connector(buf, extent)
            extent = None
            if rc == Cc.CALL_AGAIN or is_extended_delay(rc):
                if is_extended_delay(rc) and self.opts.cc_client == "legacy":
                    raise CcProtocolError(f"status {rc} (extended delay) is an error here")
                if is_extended_delay(rc):
                    self.clock.advance(extended_delay_s(rc))
                continue
            if rc == Cc.MORE_MEMORY and self.opts.cc_client == "correct":
                extent = bytearray(WORK_AREA_SIZE)
                st.extents.append(extent)
                continue
            if rc == Cc.COMPLETE:
                return st.first
            self._cc_apply(wa, st, rc)
        raise CcProtocolError("configure-connector did not complete")

    def _cc_apply(self, wa: WorkArea, st: _CcState, rc: int) -> None:
        kernel = self.opts.cc_client != "correct"
        if rc in (Cc.NEXT_SIBLING, Cc.NEXT_PROPERTY, Cc.PREV_PARENT) and st.last is None:
            msg = f"status {rc} before any NEXT_CHILD"
            if kernel:
                raise NullDereference(f"dlpar_configure_connector: NULL last node: {msg}")
            raise CcProtocolError(msg)
        if rc in (Cc.NEXT_SIBLING, Cc.NEXT_CHILD):
            name = self._cc_str(wa, st, wa.u32(8))
            node = self.tree.new_node(name)
            if rc == Cc.NEXT_SIBLING:
                assert st.last is not None
                node.parent = st.last.parent
                st.last.sibling = node
            elif st.first is None:
                node.parent, st.first = st.parent, node
            else:
                assert st.last is not None
                node.parent = st.last
                self._link_cc_child(st.last, node, kernel)
            st.last = node
        elif rc == Cc.NEXT_PROPERTY:
            assert st.last is not None
            name = self._cc_str(wa, st, wa.u32(8))
            value = read_extended(wa.buf, st.extents, wa.u32(16), wa.u32(12))
            st.last._props[name] = Property(name, value)
        elif rc == Cc.PREV_PARENT:
            assert st.last is not None
            st.last = st.last.parent if st.last is not st.first else st.first
        else:
            raise CcProtocolError(f"status {rc}")

    @staticmethod
    def _link_cc_child(last: DeviceNode, node: DeviceNode, kernel: bool) -> None:
        if kernel or last.child is None:
            last.child = node  # kernel: overwrites an existing child pointer
            return
        tail = last.child
        while tail.sibling is not None:
            tail = tail.sibling
        tail.sibling = node

    @staticmethod
    def _cc_str(wa: WorkArea, st: _CcState, off: int) -> str:
        data = bytes(wa.buf) + b"".join(bytes(e) for e in st.extents)
        if not CC_DATA_OFFSET <= off < len(data):
            raise WorkAreaOverrun("configure-connector name offset out of range", off)
        end = data.find(b"\0", off)
        if end < 0:
            raise WorkAreaOverrun("unterminated configure-connector name", off)
        return data[off:end].decode("latin-1")


def _join(parent: DeviceNode, child: DeviceNode) -> str:
    return parent.path().rstrip("/") + "/" + child.name


def _cc_phandle(node: DeviceNode) -> int:
    v = node.value("ibm,phandle", HOLDER)
    return int.from_bytes(v, "big") if v is not None and len(v) == 4 else 0


@dataclass
class _CcState:
    parent: DeviceNode
    first: DeviceNode | None = None
    last: DeviceNode | None = None
    extents: list[bytearray] = field(default_factory=list)


def changed_paths(events: list[ReconfigEvent]) -> list[str]:
    """Human-readable change list from reconfig notifications."""
    out: list[str] = []
    for e in events:
        if e.action in (Reconfig.ATTACH_NODE, Reconfig.DETACH_NODE):
            out.append(f"{e.action.value} {e.path}")
        else:
            p = e.prop or e.old
            name = p.name if p is not None else "?"
            out.append(f"{e.action.value} {e.path}:{name}")
    return out


def run_post_migration_updates(guest_tree: DeviceTree, source_platform: DeviceTree,
                               dest_platform: DeviceTree,
                               options: MobilityOptions | str = "correct",
                               clock: VirtualClock | None = None,
                               *, firmware_kwargs: dict[str, object] | None = None,
                               ) -> MobilityReport:
    """Run the destination's update sequence against a resumed guest's tree.

    ``guest_tree`` is mutated in place (it is the guest's live tree); the guest's vio bus
    and cacheinfo are bound to it as a booted guest would have them.  Hazards of faulty
    modes are reported, never raised.
    """
    from vmferry.clock import ManualClock
    from vmferry.guest.drivers import VioBus
    from vmferry.hw.spapr.rtas import RtasFirmware

    opts = MODES[options] if isinstance(options, str) else options
    fw = RtasFirmware(source_platform, dest_platform, **(firmware_kwargs or {}))  # type: ignore[arg-type]
    if not any(h.startswith("vio:") for n in guest_tree.walk() for h in n.holders):
        VioBus(guest_tree)  # a booted guest's vio devices hold their node references
    handler = MobilityHandler(guest_tree, fw, clock or ManualClock(), opts,
                              cacheinfo=CacheInfo(guest_tree))
    return handler.post_mobility_fixup()


class MobilitySysfs:
    """``/sys/kernel/mobility``: ``migration`` (write a stream id) and ``api_version``.

    ``migrate`` is the in-kernel migration routine (``pseries_migrate_partition``); it
    returns 0 or a negative errno.  The write returns the byte count or the negative errno.
    """

    api_version = "1"  # kernel performs firmware activation and the DT update

    def __init__(self, migrate: Callable[[int], int]) -> None:
        self.migrate = migrate

    def write_migration(self, text: str) -> int:
        try:
            handle = int(text.strip(), 0)  # base auto-detect, like kstrtou64(buf, 0)
        except ValueError:
            return -22
        if not 0 <= handle < 1 << 64:
            return -34  # -ERANGE
        rc = self.migrate(handle)
        return rc if rc else len(text)
