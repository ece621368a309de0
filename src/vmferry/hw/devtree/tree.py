"""A live device tree with the Linux OF core's lifetime rules.

Theory of operation
-------------------
A :class:`DeviceNode` is reference counted like ``struct device_node``: every reference has
a *holder* name (``"creation"``, ``"sysfs"``, ``"kobj:<child>"``, ``"vio:ibm,random-v1"``,
``"lookup:mobility"``...) so that leaks and use-after-free reports say who is to blame.
``refcount`` always equals the sum of the per-holder counts.

Lifetime, as in ``drivers/of/dynamic.c``:

* a node is born with one ``creation`` reference (boot unflatten or configure-connector);
* :meth:`DeviceTree.attach` links it first among its parent's children, clears
  ``DETACHED``, registers it in sysfs (+1 ``sysfs``; the parent gets +1 ``kobj:<name>``
  because the child's kobject pins its parent) and fires ``ATTACH_NODE``;
* :meth:`DeviceTree.detach` unlinks it, sets ``DETACHED``, drops it from the phandle
  cache and sysfs (the two sysfs references go) and fires ``DETACH_NODE``; ``parent`` is
  kept but no longer counted;
* when the count reaches 0 the node is *released*: a non-detached node is a bad put
  (:class:`BadPut`, nothing freed); a boot node (not ``DYNAMIC``) keeps its memory; a
  ``DYNAMIC`` node is freed: any later use raises :class:`~vmferry.errors.UseAfterFree`
  naming the node and the holder that used it.
* ``get`` on a count of 0 is the kernel's "refcount_t: addition on 0; use-after-free";
  a put below 0 is an underflow (:class:`RefcountUnderflow`, a DoubleFree).

With ``observe=True`` the tree records those hazards in :attr:`DeviceTree.hazards`
and carries on the way a kernel with a saturating refcount does (the count saturates and
is never freed), so a faulty run can be reported instead of crashing.

Children are a doubly linked list (``child``/``sibling``/``_prev``) so that attach and
detach are O(1) on 100,000-node trees; ``child``/``sibling`` are also what an unlinked
configure-connector tree is built from, exactly like the kernel's cc client.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from vmferry.errors import InvariantViolation, KernelError, ModelError, UseAfterFree
from vmferry.hw.devtree.node import (
    CREATION,
    PHANDLE_PROPS,
    SYSFS,
    BadPut,
    Canonical,
    DeviceNode,
    DevtreeError,
    HazardRecord,
    LeakRecord,
    NodeFlag,
    Notifier,
    Property,
    Reconfig,
    ReconfigEvent,
    RefcountUnderflow,
    canonical,
    phandle_of,
)
from vmferry.sync import ModelLock, yield_point

__all__ = [
    "CREATION",
    "PHANDLE_PROPS",
    "SYSFS",
    "BadPut",
    "Canonical",
    "ChangeEntry",
    "ChangeKind",
    "Changeset",
    "DeviceNode",
    "DeviceTree",
    "DevtreeError",
    "HazardRecord",
    "LeakRecord",
    "NodeFlag",
    "Notifier",
    "Property",
    "Reconfig",
    "ReconfigEvent",
    "RefcountUnderflow",
    "canonical",
    "phandle_of",
]


class DeviceTree:
    """The OF core: root, phandle cache, sysfs, notifiers, of_mutex."""

    def __init__(self, *, observe: bool = False) -> None:
        self.of_mutex = ModelLock("of_mutex")
        self.observe = observe
        self.hazards: list[HazardRecord] = []
        self.notifiers: list[Notifier] = []
        self.events: list[ReconfigEvent] = []
        self.reservations: list[tuple[int, int]] = []
        self.boot_cpuid_phys = 0
        self._phandles: dict[int, DeviceNode] = {}
        self._dynamic_live: set[DeviceNode] = set()
        self._detached: set[DeviceNode] = set()  # detached, not yet released
        self._pending: list[ReconfigEvent] = []
        self.root = DeviceNode.make_root()
        self.root.tree = self
        self.root.in_sysfs = True
        self._add_ref(self.root, SYSFS)


    # -- hazard plumbing --------------------------------------------------------------------

    def _hazard(self, err: Exception, node: DeviceNode, holder: str) -> None:
        if not self.observe:
            raise err
        name = getattr(err, "hazard", type(err).__name__)
        self.hazards.append(HazardRecord(name, node.path(), holder, str(err)))

    def _add_ref(self, node: DeviceNode, holder: str) -> None:
        node.refcount += 1
        node.holders[holder] = node.holders.get(holder, 0) + 1

    # -- of_node_get / of_node_put ----------------------------------------------------------

    def get(self, node: DeviceNode | None, holder: str) -> DeviceNode | None:
        if node is None:
            return None
        yield_point(f"of_node_get {node.name}", node, write=True)
        node.check_alive(holder)
        if node.refcount == 0 and not node.saturated:
            self._hazard(
                UseAfterFree(f"refcount_t: addition on 0; use-after-free: {holder} took "
                             f"a reference on released node {node.path()!r}"), node, holder)
            node.saturated = True
            return node
        if not node.saturated:
            self._add_ref(node, holder)
        return node

    def put(self, node: DeviceNode | None, holder: str) -> None:
        if node is None:
            return
        yield_point(f"of_node_put {node.name}", node, write=True)
        node.check_alive(holder)
        if node.saturated:
            return
        if node.refcount == 0:
            self._hazard(RefcountUnderflow(
                f"refcount_t: underflow: {holder} put released node {node.path()!r}"),
                node, holder)
            node.saturated = True
            return
        held = node.holders.get(holder, 0)
        if held == 0:
            # The kernel has no per-holder counts: the put still lands (on someone else's
            # reference); we remember who did it.
            self.hazards.append(HazardRecord(
                "foreign-put", node.path(), holder,
                f"{holder} put a reference it does not hold on {node.path()!r}"))
            victim = next(iter(node.holders))
            node.holders[victim] -= 1
            if node.holders[victim] == 0:
                del node.holders[victim]
        elif held == 1:
            del node.holders[holder]
        else:
            node.holders[holder] = held - 1
        node.refcount -= 1
        if node.refcount == 0:
            self._release(node, holder)

    def _release(self, node: DeviceNode, holder: str) -> None:
        if not node.detached:
            node.refcount = 1  # kernel: warn, nothing freed
            node.holders["<bad-put>"] = 1
            self._hazard(BadPut(f"bad of_node_put() on {node.path()!r} by {holder}"),
                         node, holder)
            return
        node.released = True
        self._detached.discard(node)
        if NodeFlag.DYNAMIC in node.flags:
            self._dynamic_live.discard(node)

    # -- construction -----------------------------------------------------------------------

    def new_node(self, name: str, props: list[Property] | None = None, *,
                 dynamic: bool = True) -> DeviceNode:
        """Allocate an unlinked node (refcount 1, ``creation``), as configure-connector."""
        node = DeviceNode(name, dynamic=dynamic)
        node.tree = self
        for p in props or ():
            node.store_property(p)
        if dynamic:
            self._dynamic_live.add(node)
        return node

    def free_unlinked(self, node: DeviceNode | None) -> None:
        """``dlpar_free_cc_nodes``: kfree child, sibling, then node (no refcounts)."""
        while node is not None:
            self.free_unlinked(node.child)
            nxt = node.sibling
            node.released = True
            node.refcount = 0
            node.holders.clear()
            self._dynamic_live.discard(node)
            node = nxt

    def add_boot_node(self, parent: DeviceNode, name: str,
                      props: list[Property] | None = None) -> DeviceNode:
        """Unflatten-time creation: appended in order, attached, in sysfs."""
        if parent.child_by_name(name) is not None:
            raise DevtreeError(f"duplicate node {name!r} under {parent.path()!r}")
        node = self.new_node(name, props, dynamic=False)
        node.parent = parent
        parent.link_last(node)
        self._finish_attach(node)
        return node

    # -- linking ----------------------------------------------------------------------------





    def _finish_attach(self, node: DeviceNode) -> None:
        node.flags &= ~NodeFlag.DETACHED
        node.phandle = phandle_of(node)
        if node.phandle:
            self._phandles[node.phandle] = node
        self._sysfs_add(node)

    def _sysfs_add(self, node: DeviceNode) -> None:
        parent = node.parent
        assert parent is not None
        taken = {c.sysfs_name for c in parent.children() if c.in_sysfs and c is not node} \
            if parent.child_by_name(node.name) is not node else set()
        name, k = node.name, 0
        while name in taken:
            k += 1
            name = f"{node.name}#{k}"
        node.sysfs_name = name
        node.in_sysfs = True
        self._add_ref(node, SYSFS)
        self._add_ref(parent, f"kobj:{name}")

    def _sysfs_del(self, node: DeviceNode) -> None:
        if not node.in_sysfs:
            return
        node.in_sysfs = False
        assert node.parent is not None
        self.put(node, SYSFS)
        self.put(node.parent, f"kobj:{node.sysfs_name}")

    # -- dynamic attach/detach (of_attach_node / of_detach_node) ---------------------------

    def attach(self, node: DeviceNode, parent: DeviceNode, *, keep_links: bool = False) -> None:
        """``of_attach_node``: ``node`` becomes its parent's first child.

        Like the kernel, ``child`` of the attached node is cleared (its unlinked subtree is
        dropped) unless ``keep_links`` (used by changesets that attach each node).
        """
        with self.of_mutex:
            event = self._attach_locked(node, parent, keep_links)
        self._notify(event)

    def detach(self, node: DeviceNode) -> None:
        """``of_detach_node``: unlink, mark DETACHED, leave sysfs; ``parent`` is kept."""
        with self.of_mutex:
            event = self._detach_locked(node)
        self._notify(event)

    def _attach_locked(self, node: DeviceNode, parent: DeviceNode,
                       keep_links: bool) -> ReconfigEvent:
        yield_point(f"attach {node.name}", parent, write=True)
        parent.check_alive("attach")
        node.check_alive("attach")
        if node.in_sysfs:
            raise KernelError(17, f"{node.path()!r} is already attached")
        node.parent = parent
        if not keep_links:
            node.forget_children()
        parent.link_first(node)
        self._finish_attach(node)
        return ReconfigEvent(Reconfig.ATTACH_NODE, node.path())

    def _detach_locked(self, node: DeviceNode) -> ReconfigEvent:
        yield_point(f"detach {node.name}", node, write=True)
        node.check_alive("detach")
        if node.detached or node.parent is None or not node.in_sysfs:
            raise KernelError(22, f"detach of {node.path()!r}: not attached")
        path = node.path()
        node.unlink()
        node.flags |= NodeFlag.DETACHED
        self._detached.add(node)
        if node.phandle and self._phandles.get(node.phandle) is node:
            del self._phandles[node.phandle]
        self._sysfs_del(node)
        return ReconfigEvent(Reconfig.DETACH_NODE, path)

    def _reattach_locked(self, node: DeviceNode) -> None:
        """Undo of a changeset detach (the node keeps its references)."""
        assert node.parent is not None
        self._add_ref(node, "changeset")  # sysfs re-registration below re-adds sysfs
        self._detached.discard(node)
        node.parent.link_first(node)
        self._finish_attach(node)
        self.put(node, "changeset")

    def detach_recursive(self, node: DeviceNode) -> None:
        """``dlpar_detach_node``: children first, then the node, then drop ``creation``."""
        c = node.child
        while c is not None:
            nxt = c.sibling
            self.get(c, "detach-iter")
            self.detach_recursive(c)
            self.put(c, "detach-iter")
            c = nxt
        self.detach(node)
        self.put(node, CREATION)

    # -- properties -------------------------------------------------------------------------

    def update_property(self, node: DeviceNode, prop: Property) -> None:
        """``of_update_property``: replace-or-add; the old value goes to ``deadprops``."""
        with self.of_mutex:
            yield_point(f"update {node.name}/{prop.name}", node, write=True)
            node.check_alive("update_property")
            old = node.store_property(prop)
            if old is not None:
                node.deadprops.append(old)
            if prop.name in PHANDLE_PROPS and node.in_sysfs:
                self.index_phandle(node)
        if node.in_sysfs:
            action = Reconfig.ADD_PROPERTY if old is None else Reconfig.UPDATE_PROPERTY
            self._notify(ReconfigEvent(action, node.path(), prop, old))

    def remove_property(self, node: DeviceNode, name: str) -> None:
        """``of_remove_property``; a missing property is -ENODEV."""
        with self.of_mutex:
            yield_point(f"remove {node.name}/{name}", node, write=True)
            node.check_alive("remove_property")
            old = node.drop_property(name)
            if old is None:
                raise KernelError(19, f"{node.path()!r} has no property {name!r}")
            node.deadprops.append(old)
        if node.in_sysfs:
            self._notify(ReconfigEvent(Reconfig.REMOVE_PROPERTY, node.path(), None, old))

    def index_phandle(self, node: DeviceNode) -> None:
        """Re-read ``node``'s phandle property into the phandle cache."""
        if node.phandle and self._phandles.get(node.phandle) is node:
            del self._phandles[node.phandle]
        node.phandle = phandle_of(node)
        if node.phandle:
            self._phandles[node.phandle] = node

    def _notify(self, event: ReconfigEvent) -> None:
        self.events.append(event)
        for fn in list(self.notifiers):
            fn(event)

    # -- lookups (counted) ------------------------------------------------------------------

    def find_by_phandle(self, phandle: int, holder: str) -> DeviceNode | None:
        yield_point(f"find phandle {phandle:#x}", ("phandle", phandle), write=False)
        if phandle == 0:
            return None
        node = self._phandles.get(phandle)
        if node is None or node.detached:
            return None
        return self.get(node, holder)

    def get_parent(self, node: DeviceNode, holder: str) -> DeviceNode | None:
        node.check_alive(holder)
        return self.get(node.parent, holder)

    def find_by_path(self, path: str) -> DeviceNode | None:
        """Uncounted path lookup (tests, exporters)."""
        node: DeviceNode | None = self.root
        for part in (p for p in path.split("/") if p):
            node = None if node is None else node.child_by_name(part)
        return node

    def node_by_phandle(self, phandle: int) -> DeviceNode | None:
        """Uncounted lookup for consistent single-threaded code (firmware, exporters)."""
        return self._phandles.get(phandle)

    def walk(self) -> Iterator[DeviceNode]:
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            kids = list(n.children())
            stack.extend(reversed(kids))

    # -- reports ----------------------------------------------------------------------------

    def reachable(self) -> set[DeviceNode]:
        return set(self.walk())

    def dangling(self) -> list[DeviceNode]:
        """Held, detached nodes whose uncounted ``parent`` pointer leads to a released node."""
        return [n for n in self._detached
                if n.refcount > 0 and n.parent is not None and n.parent.released]

    def leak_report(self) -> list[LeakRecord]:
        """Nodes still allocated but not in the tree: detached nodes someone still holds
        and dynamic nodes never linked (e.g. configure-connector children a single-node
        attach dropped)."""
        live = self.reachable()
        out: list[LeakRecord] = []
        for node in sorted(self._dynamic_live | self._detached, key=lambda n: n.path()):
            if node in live or node.released:
                continue
            state = "detached" if node.detached else (
                "unlinked" if node.parent is None or not node.in_sysfs else "orphaned")
            out.append(LeakRecord(node.path() if node.parent else node.name, node.refcount,
                                  tuple(sorted(node.holders.items())), state))
        return out

    def refcount_total(self) -> int:
        return sum(n.refcount for n in self.walk())

    def check_invariants(self) -> None:
        """Invariants 1-4 of docs/models/pseries-mobility.md §12.2 over the reachable tree."""
        for node in self.walk():
            if node.released:
                raise UseAfterFree(f"released node {node.path()!r} is reachable")
            if node.detached:
                raise InvariantViolation(f"detached node {node.path()!r} is reachable")
            if not node.saturated and node.refcount != sum(node.holders.values()):
                raise InvariantViolation(f"{node.path()!r}: refcount != holders")
            names = [c.sysfs_name for c in node.children()]
            if len(names) != len(set(names)):
                raise InvariantViolation(f"{node.path()!r}: duplicate sysfs names")
        for ph, node in self._phandles.items():
            if node.detached or node.released or node.phandle != ph:
                raise InvariantViolation(f"phandle cache entry {ph:#x} is stale")


class ChangeKind(enum.Enum):
    ATTACH = "attach"
    DETACH = "detach"
    UPDATE = "update"


@dataclass(slots=True)
class ChangeEntry:
    kind: ChangeKind
    node: DeviceNode
    parent: DeviceNode | None = None
    prop: Property | None = None
    old: Property | None = None


class Changeset:
    """``of_changeset``: entries applied all-or-nothing; notifications only on success.

    Each entry holds a ``changeset`` reference on its node until :meth:`destroy`.
    """

    def __init__(self, tree: DeviceTree) -> None:
        self.tree = tree
        self.entries: list[ChangeEntry] = []
        self.applied = False

    def _add(self, entry: ChangeEntry) -> None:
        self.tree.get(entry.node, "changeset")
        self.entries.append(entry)

    def attach(self, node: DeviceNode, parent: DeviceNode) -> None:
        self._add(ChangeEntry(ChangeKind.ATTACH, node, parent))

    def detach(self, node: DeviceNode) -> None:
        self._add(ChangeEntry(ChangeKind.DETACH, node))

    def update(self, node: DeviceNode, prop: Property) -> None:
        self._add(ChangeEntry(ChangeKind.UPDATE, node, prop=prop))

    def attach_subtree(self, top: DeviceNode, parent: DeviceNode) -> None:
        """Collect a whole unlinked cc tree (node, children, siblings) before any relink."""
        pending: list[tuple[DeviceNode, DeviceNode]] = []
        node: DeviceNode | None = top
        while node is not None:
            pending.append((node, parent))
            node = node.sibling
        i = 0
        while i < len(pending):
            n, _ = pending[i]
            c = n.child
            while c is not None:
                pending.append((c, n))
                c = c.sibling
            i += 1
        for n, p in pending:
            n.child = n.sibling = None
            self.attach(n, p)

    def apply(self) -> None:
        tree = self.tree
        events: list[ReconfigEvent] = []
        done: list[ChangeEntry] = []
        with tree.of_mutex:
            try:
                for e in self.entries:
                    events.append(self._apply_one(e))
                    done.append(e)
            except (ModelError, InvariantViolation):
                for e in reversed(done):
                    self._revert_one(e)
                raise
        self.applied = True
        for ev in events:
            tree._notify(ev)

    def _apply_one(self, e: ChangeEntry) -> ReconfigEvent:
        tree = self.tree
        if e.kind is ChangeKind.ATTACH:
            assert e.parent is not None
            return tree._attach_locked(e.node, e.parent, keep_links=True)
        if e.kind is ChangeKind.DETACH:
            return tree._detach_locked(e.node)
        assert e.prop is not None
        e.node.check_alive("changeset")
        e.old = e.node.store_property(e.prop)
        if e.old is not None:
            e.node.deadprops.append(e.old)
        action = Reconfig.ADD_PROPERTY if e.old is None else Reconfig.UPDATE_PROPERTY
        return ReconfigEvent(action, e.node.path(), e.prop, e.old)

    def _revert_one(self, e: ChangeEntry) -> None:
        tree = self.tree
        if e.kind is ChangeKind.ATTACH:
            tree._detach_locked(e.node)
            e.node.flags &= ~NodeFlag.DETACHED
            e.node.parent = None
        elif e.kind is ChangeKind.DETACH:
            tree._reattach_locked(e.node)
        else:
            assert e.prop is not None
            if e.old is None:
                e.node.drop_property(e.prop.name)
            else:
                e.node.store_property(e.old)
                e.node.deadprops.remove(e.old)

    def destroy(self) -> None:
        for e in self.entries:
            self.tree.put(e.node, "changeset")
        self.entries.clear()
