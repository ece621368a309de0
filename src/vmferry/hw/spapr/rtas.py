"""Firmware side of the post-migration device-tree update: RTAS work areas.

Theory of operation
-------------------
After a partition moves, the destination firmware describes the difference between the
source platform's tree and its own through three RTAS calls, each exchanging one 4 KiB
big-endian work area (LoPAR ``sec_rtas_update_nodes``, ``sec_rtas_update_properties``,
``ch_dynamic_reconfig``):

``ibm,update-nodes(wa, scope)``
    16-byte header (state word + 12 reserved bytes), then operation lists
    ``(opcode << 24) | count`` + operands, ending with a 0 word.  Deletes precede updates
    precede adds.  Status 1 = more: the caller echoes the 16-byte header unchanged.
``ibm,update-properties(wa, scope)``
    ``phandle | state | reserved(8) | N`` then N byte-packed descriptors
    ``name\\0 | vd | value``.  The first call for a node starts with the path descriptor
    (empty name).  ``vd`` = 0x80000000 deletes, bit 31 set = partial chunk of length
    ``-vd``, positive = final chunk.
``ibm,configure-connector(wa, extent)``
    A state machine per DRC index walking the new subtree depth-first: NEXT_CHILD,
    NEXT_SIBLING, NEXT_PROPERTY, PREV_PARENT, COMPLETE; MORE_MEMORY (5) asks for one
    more 4 KiB extent page.  Two encodings: PAPR/PowerVM (siblings announced with
    NEXT_SIBLING) and QEMU (one response per FDT tag, never NEXT_SIBLING).

:class:`RtasFirmware` computes an :class:`UpdatePlan` from a source and a destination
platform tree (:func:`compute_update_plan`; platform facilities are always deleted and
re-added, as the PowerVM firmware in the seed thread does; cache nodes that change are
replaced the same way) and serves those calls, validating every continuation header.
Faults (busy, extended delay, hardware error) are injected per call number.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from vmferry.errors import ModelError
from vmferry.hw.devtree.tree import DeviceNode, DeviceTree, Property, phandle_of
from vmferry.hw.spapr.workarea import (
    CC_DATA_OFFSET,
    MIGRATION_SCOPE,
    NODE_COUNT_MASK,
    UPDATE_NODES_HEADER,
    UPDATE_PROPS_ECHO,
    UPDATE_PROPS_HEADER,
    VD_DELETE,
    WORK_AREA_SIZE,
    Cc,
    CcField,
    NodeOp,
    Rc,
    UpdateNodesField,
    UpdatePropsField,
    WorkArea,
)

PLATFORM_FACILITIES = "ibm,platform-facilities"


# --- the plan: what differs between two platform trees ----------------------------------------


@dataclass(frozen=True, slots=True)
class PropChange:
    name: str
    value: bytes | None  # None: delete


@dataclass(frozen=True, slots=True)
class NodeUpdate:
    phandle: int
    path: str
    changes: tuple[PropChange, ...]


@dataclass(frozen=True, slots=True)
class SubtreeSpec:
    name: str
    props: tuple[Property, ...]
    children: tuple[SubtreeSpec, ...] = ()

    @classmethod
    def of(cls, node: DeviceNode) -> SubtreeSpec:
        return cls(node.name, tuple(node.properties("firmware")),
                   tuple(cls.of(c) for c in node.children()))

    def count(self) -> int:
        return 1 + sum(c.count() for c in self.children)


@dataclass(frozen=True, slots=True)
class NodeAdd:
    parent_phandle: int
    drc_index: int
    subtree: SubtreeSpec


@dataclass(frozen=True, slots=True)
class UpdatePlan:
    deletes: tuple[int, ...] = ()
    updates: tuple[NodeUpdate, ...] = ()
    adds: tuple[NodeAdd, ...] = ()
    delete_paths: tuple[str, ...] = ()


def _by_phandle(tree: DeviceTree) -> dict[int, DeviceNode]:
    out: dict[int, DeviceNode] = {}
    for n in tree.walk():
        ph = phandle_of(n)
        if ph:
            out[ph] = n
    return out


def _props(node: DeviceNode) -> dict[str, bytes]:
    return {p.name: p.value for p in node.properties("firmware")}


def _is_readd(node: DeviceNode, readd_types: frozenset[str]) -> bool:
    t = node.device_type("firmware")
    p = node.parent
    return t in readd_types or (p is not None and p.device_type("firmware") in readd_types)


def _parent_ph(node: DeviceNode) -> int:
    return 0 if node.parent is None else phandle_of(node.parent)


def compute_update_plan(src: DeviceTree, dst: DeviceTree, *,
                        readd_types: frozenset[str] = frozenset({PLATFORM_FACILITIES}),
                        replace_changed_types: frozenset[str] = frozenset({"cache"}),
                        ) -> UpdatePlan:
    """Deletes (post-order), updates, adds (subtree tops) turning ``src`` into ``dst``.

    Nodes are matched by ``ibm,phandle``.  Nodes whose own or parent device_type is in
    ``readd_types`` are always deleted and re-added (PowerVM platform facilities); nodes
    of a type in ``replace_changed_types`` are replaced when any property differs.
    """
    s, d = _by_phandle(src), _by_phandle(dst)
    replaced: set[int] = set()
    for ph, n in s.items():
        m = d.get(ph)
        if m is None or ph == phandle_of(src.root):
            continue
        moved = _parent_ph(n) != _parent_ph(m)
        changed = _props(n) != _props(m)
        if moved or _is_readd(n, readd_types) or (
                changed and n.device_type("firmware") in replace_changed_types):
            replaced.add(ph)
    deletes = _post_order_deletes(src, s, d, replaced)
    updates = tuple(_node_update(n, s[ph], ph) for ph, n in d.items()
                    if ph in s and ph not in replaced
                    and _props(n) != _props(s[ph]))
    adds = _adds(dst, s, replaced)
    return UpdatePlan(tuple(ph for ph, _ in deletes), updates, adds,
                      tuple(p for _, p in deletes))


def _post_order_deletes(src: DeviceTree, s: dict[int, DeviceNode], d: dict[int, DeviceNode],
                        replaced: set[int]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    doomed: set[DeviceNode] = set()
    for n in src.walk():  # pre-order: a doomed parent dooms its subtree
        ph = phandle_of(n)
        if (n.parent is not None and n.parent in doomed) or (ph in s and (
                ph not in d or ph in replaced)):
            doomed.add(n)

    stack: list[tuple[DeviceNode, bool]] = [(src.root, True)]
    while stack:  # iterative post-order (deep trees)
        n, entering = stack.pop()
        if entering:
            stack.append((n, False))
            stack.extend((c, True) for c in reversed(list(n.children())))
        elif n in doomed:
            ph = phandle_of(n)
            if not ph:
                raise ModelError(f"{n.path()!r} must carry ibm,phandle to be deleted")
            out.append((ph, n.path()))
    return out


def _node_update(new: DeviceNode, old: DeviceNode, ph: int) -> NodeUpdate:
    before = {p.name: p.value for p in old.properties("firmware")}
    after = {p.name: p.value for p in new.properties("firmware")}
    changes = [PropChange(k, v) for k, v in after.items() if before.get(k) != v]
    changes += [PropChange(k, None) for k in before if k not in after]
    return NodeUpdate(ph, new.path(), tuple(changes))


def _adds(dst: DeviceTree, s: dict[int, DeviceNode], replaced: set[int]) -> tuple[NodeAdd, ...]:
    out: list[NodeAdd] = []
    new_nodes: set[DeviceNode] = set()
    tops: list[DeviceNode] = []
    for n in dst.walk():
        ph = phandle_of(n)
        if n.parent is None:
            continue
        if n.parent in new_nodes or not (ph and ph in s and ph not in replaced):
            if n.parent not in new_nodes:
                tops.append(n)
            new_nodes.add(n)
    used = {_drc_of(n) for n in tops} - {None}
    next_drc = 0x20000000
    for n in tops:
        drc = _drc_of(n)
        if drc is None:
            next_drc += 1
            while next_drc in used:
                next_drc += 1
            drc = next_drc
        elif any(a.drc_index == drc for a in out):
            raise ModelError(f"two added subtrees share drc-index {drc:#x}")
        out.append(NodeAdd(_parent_ph(n), drc, SubtreeSpec.of(n)))
    return tuple(out)


def _drc_of(node: DeviceNode) -> int | None:
    v = node.value("ibm,my-drc-index", "firmware")
    return int.from_bytes(v, "big") if v is not None and len(v) == 4 else None


# --- configure-connector response streams ------------------------------------------------------


CcResponse = tuple[Cc, str, bytes]


def cc_responses(top: SubtreeSpec, style: str) -> Iterator[CcResponse]:
    """The response sequence for one connector in ``"papr"`` or ``"qemu"`` encoding."""
    if style == "papr":
        yield from _papr([top], nested=False)
        yield (Cc.COMPLETE, "", b"")
    elif style == "qemu":
        yield from _qemu(top, depth=0)
    else:
        raise ModelError(f"unknown configure-connector style {style!r}")


def _cc_props(n: SubtreeSpec) -> Iterator[CcResponse]:
    for p in n.props:
        yield (Cc.NEXT_PROPERTY, p.name, p.value)


def _papr(nodes: list[SubtreeSpec] | tuple[SubtreeSpec, ...], nested: bool) -> Iterator[CcResponse]:
    for i, n in enumerate(nodes):
        yield (Cc.NEXT_CHILD if i == 0 else Cc.NEXT_SIBLING, n.name, b"")
        yield from _cc_props(n)
        if n.children:
            yield from _papr(n.children, nested=True)
    if nested:
        yield (Cc.PREV_PARENT, "", b"")


def _qemu(n: SubtreeSpec, depth: int) -> Iterator[CcResponse]:
    yield (Cc.NEXT_CHILD, n.name, b"")
    yield from _cc_props(n)
    for c in n.children:
        yield from _qemu(c, depth + 1)
    yield (Cc.PREV_PARENT, "", b"") if depth else (Cc.COMPLETE, "", b"")


# --- the firmware ------------------------------------------------------------------------------


@dataclass
class _CcSession:
    responses: list[CcResponse]
    pos: int = 0
    last_wa: bytes = b""
    extents: list[bytearray] = field(default_factory=list)


@dataclass
class _PropsSession:
    descs: list[tuple[str, bytes | None]]
    pos: int = 0
    offset: int = 0  # bytes of descs[pos] already sent
    header: bytes = b""
    seq: int = 0


class RtasFirmware:
    """The destination platform's RTAS for the post-migration update calls.

    ``capacity`` limits how many bytes of each work area the firmware fills (4096 by
    default; smaller values force continuations and split values).  ``faults`` maps
    ``(function, call_number)`` (1-based per function) to a status returned instead of
    doing the work (busy, extended delay, hardware error...).  ``unusable_drcs`` answer
    -9003 on their first configure-connector call.
    """

    def __init__(self, source_tree: DeviceTree, destination_tree: DeviceTree, *,
                 plan: UpdatePlan | None = None, capacity: int = WORK_AREA_SIZE,
                 cc_style: str = "papr", faults: dict[tuple[str, int], int] | None = None,
                 unusable_drcs: frozenset[int] = frozenset()) -> None:
        if not 64 <= capacity <= WORK_AREA_SIZE:
            raise ModelError(f"capacity {capacity} outside 64..{WORK_AREA_SIZE}")
        self.destination = destination_tree
        self.plan = plan if plan is not None else compute_update_plan(
            source_tree, destination_tree)
        self.capacity = capacity
        self.cc_style = cc_style
        self.faults = dict(faults or {})
        self.unusable_drcs = unusable_drcs
        self.calls: list[str] = []
        self._counts: dict[str, int] = {}
        self._updates = {u.phandle: u for u in self.plan.updates}
        self._dst_paths = {phandle_of(n): n.path() for n in destination_tree.walk()}
        self._adds = {a.drc_index: a for a in self.plan.adds}
        self._un_header: bytes | None = None
        self._un_pos = 0
        self._un_seq = 0
        self._props: dict[int, _PropsSession] = {}
        self._cc: dict[int, _CcSession] = {}

    def _enter(self, fn: str) -> int | None:
        self.calls.append(fn)
        n = self._counts[fn] = self._counts.get(fn, 0) + 1
        return self.faults.get((fn, n))

    def activate_firmware(self) -> int:
        fault = self._enter("ibm,activate-firmware")
        return Rc.SUCCESS if fault is None else fault

    # -- ibm,update-nodes -------------------------------------------------------------------

    def _node_items(self) -> list[tuple[NodeOp, tuple[int, ...]]]:
        items: list[tuple[NodeOp, tuple[int, ...]]] = [
            (NodeOp.DELETE, (ph,)) for ph in self.plan.deletes]
        items += [(NodeOp.UPDATE, (u.phandle,)) for u in self.plan.updates]
        items += [(NodeOp.ADD, (a.parent_phandle, a.drc_index)) for a in self.plan.adds]
        return items

    def update_nodes(self, buf: bytearray, scope: int) -> int:
        fault = self._enter("ibm,update-nodes")
        if fault is not None:
            return fault
        wa = WorkArea(buf)
        header = bytes(buf[:UPDATE_NODES_HEADER])
        if scope != MIGRATION_SCOPE:
            return Rc.PARAM_ERROR
        if header == bytes(UPDATE_NODES_HEADER):
            self._un_pos = 0
        elif header != self._un_header:
            return Rc.PARAM_ERROR
        items = self._node_items()
        off, limit = UPDATE_NODES_HEADER, self.capacity - 4
        while self._un_pos < len(items) and off + 8 <= limit:
            op = items[self._un_pos][0]
            width = 4 * len(items[self._un_pos][1])
            count, words = 0, bytearray()
            while (self._un_pos < len(items) and items[self._un_pos][0] is op
                   and off + 4 + len(words) + width <= limit and count < NODE_COUNT_MASK):
                words += b"".join(w.to_bytes(4, "big") for w in items[self._un_pos][1])
                count += 1
                self._un_pos += 1
            if count == 0:
                break
            wa.set_u32(off, (op << 24) | count)
            buf[off + 4:off + 4 + len(words)] = words
            off += 4 + len(words)
        wa.set_u32(off, 0)
        done = self._un_pos >= len(items)
        self._un_seq += 1
        wa.set_u32(UpdateNodesField.STATE, 0 if done else self._un_seq)
        self._un_header = None if done else bytes(buf[:UPDATE_NODES_HEADER])
        return Rc.SUCCESS if done else Rc.MORE

    # -- ibm,update-properties --------------------------------------------------------------

    def update_properties(self, buf: bytearray, scope: int) -> int:
        fault = self._enter("ibm,update-properties")
        if fault is not None:
            return fault
        wa = WorkArea(buf)
        if scope != MIGRATION_SCOPE:
            return Rc.PARAM_ERROR
        ph, state = wa.u32(UpdatePropsField.PHANDLE), wa.u32(UpdatePropsField.STATE)
        if state == 0:
            if ph not in self._dst_paths:
                return Rc.PARAM_ERROR
            self._props[ph] = self._new_props_session(ph)
        else:
            sess = self._props.get(ph)
            if sess is None or bytes(buf[:UPDATE_PROPS_ECHO]) != sess.header:
                return Rc.PARAM_ERROR
        return self._fill_props(wa, ph, self._props[ph])

    def _new_props_session(self, ph: int) -> _PropsSession:
        path = self._dst_paths[ph].encode("latin-1") + b"\0"
        descs: list[tuple[str, bytes | None]] = [("", path)]
        upd = self._updates.get(ph)
        if upd is not None:
            descs += [(c.name, c.value) for c in upd.changes]
        return _PropsSession(descs)

    def _fill_props(self, wa: WorkArea, ph: int, sess: _PropsSession) -> int:
        buf, off, n = wa.buf, UPDATE_PROPS_HEADER, 0
        buf[UpdatePropsField.STATE:UPDATE_PROPS_HEADER] = bytes(
            UPDATE_PROPS_HEADER - UpdatePropsField.STATE)
        while sess.pos < len(sess.descs):
            name, value = sess.descs[sess.pos]
            head = len(name) + 1 + 4
            room = self.capacity - off - head
            rest = b"" if value is None else value[sess.offset:]
            if room < (1 if rest else 0) or room < 0:
                break
            buf[off:off + len(name) + 1] = name.encode("latin-1") + b"\0"
            off += len(name) + 1
            if value is None:
                vd, chunk = VD_DELETE, b""
            elif len(rest) <= room:
                vd, chunk = len(rest), rest
            else:
                chunk = rest[:room]
                vd = (-len(chunk)) & 0xFFFFFFFF
            wa.set_u32(off, vd)
            buf[off + 4:off + 4 + len(chunk)] = chunk
            off += 4 + len(chunk)
            n += 1
            if vd & 0x80000000 and vd != VD_DELETE:
                sess.offset += len(chunk)
                break
            sess.pos, sess.offset = sess.pos + 1, 0
        wa.set_u32(UpdatePropsField.COUNT, n)
        wa.set_u32(UpdatePropsField.PHANDLE, ph)
        if sess.pos >= len(sess.descs):
            del self._props[ph]
            return Rc.SUCCESS
        sess.seq += 1
        wa.set_u32(UpdatePropsField.STATE, sess.seq)
        sess.header = bytes(buf[:UPDATE_PROPS_ECHO])
        return Rc.MORE

    # -- ibm,configure-connector ------------------------------------------------------------

    def configure_connector(self, buf: bytearray, extent: bytearray | None = None) -> int:
        fault = self._enter("ibm,configure-connector")
        if fault is not None:
            return fault
        wa = WorkArea(buf)
        drc = wa.u32(CcField.DRC_INDEX)
        sess = self._cc.get(drc)
        fresh = not any(buf[4:])  # entry 1 and everything after zero: a new sequence
        if sess is None or (fresh and bytes(buf) != sess.last_wa):
            if drc not in self._adds:
                return Rc.PARAM_ERROR
            if drc in self.unusable_drcs:
                return Cc.ERR_CFG_USE
            sess = self._cc[drc] = _CcSession(list(cc_responses(self._adds[drc].subtree,
                                                               self.cc_style)))
        elif bytes(buf) != sess.last_wa:
            return Rc.PARAM_ERROR
        if extent is not None:
            if len(extent) != WORK_AREA_SIZE:
                return Rc.PARAM_ERROR
            sess.extents.append(extent)
        return self._cc_step(wa, drc, sess)

    def _cc_step(self, wa: WorkArea, drc: int, sess: _CcSession) -> int:
        status, name, value = sess.responses[sess.pos]
        need = CC_DATA_OFFSET + len(name) + 1 + len(value)
        if need > WORK_AREA_SIZE * (1 + len(sess.extents)):
            sess.last_wa = bytes(wa.buf)
            return Cc.MORE_MEMORY
        if status in (Cc.NEXT_CHILD, Cc.NEXT_SIBLING, Cc.NEXT_PROPERTY):
            self._cc_write(wa, sess, CC_DATA_OFFSET, name.encode("latin-1") + b"\0")
            wa.set_u32(CcField.NAME_OFFSET, CC_DATA_OFFSET)
        if status is Cc.NEXT_PROPERTY:
            voff = CC_DATA_OFFSET + len(name) + 1
            self._cc_write(wa, sess, voff, value)
            wa.set_u32(CcField.VALUE_LENGTH, len(value))
            wa.set_u32(CcField.VALUE_OFFSET, voff)
        sess.pos += 1
        if status is Cc.COMPLETE:
            del self._cc[drc]
            return Cc.COMPLETE
        sess.last_wa = bytes(wa.buf)
        return int(status)

    @staticmethod
    def _cc_write(wa: WorkArea, sess: _CcSession, off: int, data: bytes) -> None:
        pages = [wa.buf, *sess.extents]
        for i, b in enumerate(data):
            pos = off + i
            pages[pos // WORK_AREA_SIZE][pos % WORK_AREA_SIZE] = b


def be32(*cells: int) -> bytes:
    return struct.pack(f">{len(cells)}I", *cells)
