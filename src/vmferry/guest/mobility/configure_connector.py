"""The guest's ``ibm,configure-connector`` client and the attach of a new subtree.

``dlpar_configure_connector`` asks firmware, call after call, for the next node or
property of the subtree below a DRC index and builds it unlinked (through the tree's
:class:`~vmferry.hw.devtree.builder.NodeBuilder`); :meth:`ConfigureConnectorClient.add_node`
then attaches it below its parent, whole through a changeset (``correct``) or one node at
a time (upstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmferry.errors import ModelError
from vmferry.guest.mobility.core import (
    HOLDER,
    CcProtocolError,
    Change,
    MobilityCore,
    NullDereference,
)
from vmferry.hw.devtree.builder import TreeBuilder
from vmferry.hw.devtree.tree import Changeset, DeviceNode, HazardRecord, Property
from vmferry.hw.spapr.rtas import PLATFORM_FACILITIES
from vmferry.hw.spapr.workarea import (
    CC_DATA_OFFSET,
    WORK_AREA_SIZE,
    Cc,
    CcField,
    WorkArea,
    WorkAreaError,
    WorkAreaOverrun,
    extended_delay_s,
    is_extended_delay,
    read_extended,
)
from vmferry.sync import yield_point


class ConfigureConnectorClient(MobilityCore):
    """``ibm,configure-connector`` and the add of the subtree it describes."""

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

    def configure_connector(self, drc_index: int, parent: DeviceNode) -> DeviceNode | None:
        """Build the unlinked subtree for ``drc_index`` (``dlpar_configure_connector``)."""
        buf = bytearray(WORK_AREA_SIZE)
        wa = WorkArea(buf)
        wa.set_u32(CcField.DRC_INDEX, drc_index)
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
            name = self._cc_str(wa, st, wa.u32(CcField.NAME_OFFSET))
            node = TreeBuilder(self.tree).new_unlinked(name)
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
            name = self._cc_str(wa, st, wa.u32(CcField.NAME_OFFSET))
            value = read_extended(wa.buf, st.extents, wa.u32(CcField.VALUE_OFFSET),
                                  wa.u32(CcField.VALUE_LENGTH))
            TreeBuilder(self.tree).set_property(st.last, Property(name, value))
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
