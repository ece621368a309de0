"""The guest's ``ibm,update-nodes`` walk (``pseries_devicetree_update``).

Firmware hands out pages of ``(opcode << 24) | count`` lists; per phandle the guest looks
the node up (counted), deletes it, updates it (:mod:`.update_properties`) or adds a
subtree below it (:mod:`.configure_connector`), then drops its lookup reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from vmferry.guest.mobility.configure_connector import ConfigureConnectorClient
from vmferry.guest.mobility.core import HOLDER, Action, Change, UserSpace
from vmferry.guest.mobility.update_properties import UpdatePropertiesClient
from vmferry.hw.devtree.tree import DeviceNode
from vmferry.hw.spapr.rtas import PLATFORM_FACILITIES
from vmferry.hw.spapr.workarea import (
    NODE_COUNT_MASK,
    UPDATE_NODES_HEADER,
    WORK_AREA_SIZE,
    NodeOp,
    Rc,
    WorkArea,
    WorkAreaError,
)


class UpdateNodesClient(UpdatePropertiesClient, ConfigureConnectorClient):
    """``ibm,update-nodes`` and the delete / update / add it dispatches."""

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
