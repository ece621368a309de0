"""Device-tree nodes and properties: ``struct device_node`` and ``struct property``.

A node owns its properties and its child list; :class:`~vmferry.hw.devtree.tree.DeviceTree`
(counted, locked, notifying operations) and :class:`~vmferry.hw.devtree.builder.TreeBuilder`
(construction before a tree is live, and unlinked configure-connector subtrees) change them
only through the node's structure methods.  See :mod:`vmferry.hw.devtree.tree` for the
lifetime rules.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmferry.errors import DoubleFree, InvariantViolation, ModelError, UseAfterFree
from vmferry.sync import yield_point

if TYPE_CHECKING:
    from vmferry.hw.devtree.tree import DeviceTree

CREATION = "creation"
SYSFS = "sysfs"
PHANDLE_PROPS = ("phandle", "linux,phandle", "ibm,phandle")


class DevtreeError(ModelError):
    """A device-tree operation was refused (bad path, duplicate, wrong state)."""


class BadPut(InvariantViolation):
    """``of_node_put`` brought an attached node to 0 ("bad of_node_put()")."""

    hazard = "bad-put"


class RefcountUnderflow(DoubleFree):
    """A put on a node whose count is already 0."""

    hazard = "refcount-underflow"


class NodeFlag(enum.Flag):
    NONE = 0
    DYNAMIC = enum.auto()
    DETACHED = enum.auto()


class Reconfig(enum.Enum):
    """``OF_RECONFIG_*`` actions (symbolic only)."""

    ATTACH_NODE = "attach-node"
    DETACH_NODE = "detach-node"
    ADD_PROPERTY = "add-property"
    REMOVE_PROPERTY = "remove-property"
    UPDATE_PROPERTY = "update-property"


@dataclass(frozen=True, slots=True)
class Property:
    name: str
    value: bytes

    def __post_init__(self) -> None:
        if not self.name or "\0" in self.name:
            raise DevtreeError(f"invalid property name {self.name!r}")


@dataclass(frozen=True, slots=True)
class ReconfigEvent:
    action: Reconfig
    path: str
    prop: Property | None = None
    old: Property | None = None


@dataclass(frozen=True, slots=True)
class HazardRecord:
    hazard: str
    node: str
    holder: str
    message: str


@dataclass(frozen=True, slots=True)
class LeakRecord:
    node: str
    refcount: int
    holders: tuple[tuple[str, int], ...]
    state: str  # "detached" | "unlinked" (never attached) | "orphaned" (unreachable)


Notifier = Callable[[ReconfigEvent], None]


class DeviceNode:
    """One ``struct device_node``.  Use the tree's API; fields mirror the kernel's."""

    __slots__ = (
        "_child_names",
        "_dups",
        "_last",
        "_name",
        "_prev",
        "_props",
        "child",
        "deadprops",
        "flags",
        "holders",
        "in_sysfs",
        "parent",
        "phandle",
        "refcount",
        "released",
        "saturated",
        "sibling",
        "sysfs_name",
        "tree",
    )

    def __init__(self, name: str, *, dynamic: bool = False) -> None:
        if not name or "/" in name or "\0" in name:
            raise DevtreeError(f"invalid node name {name!r}")
        self._name = name
        self._props: dict[str, Property] = {}
        self.deadprops: list[Property] = []
        self.parent: DeviceNode | None = None
        self.child: DeviceNode | None = None
        self.sibling: DeviceNode | None = None
        self._prev: DeviceNode | None = None
        self._last: DeviceNode | None = None
        self._child_names: dict[str, DeviceNode] | None = None
        self._dups = 0  # children whose name another child already indexes
        self.flags = NodeFlag.DYNAMIC if dynamic else NodeFlag.NONE
        self.phandle = 0
        # invariant: refcount == sum(holders.values()) unless saturated
        self.refcount = 1
        self.holders: dict[str, int] = {CREATION: 1}
        self.released = False
        self.saturated = False
        self.in_sysfs = False
        self.sysfs_name = ""
        self.tree: DeviceTree | None = None

    # -- guarded access: any use of a freed node is a use-after-free -----------------------

    def check_alive(self, holder: str) -> None:
        if self.released and NodeFlag.DYNAMIC in self.flags:
            raise UseAfterFree(f"{holder} used freed node {self._name!r}")

    @property
    def name(self) -> str:
        return self._name

    def prop(self, name: str, holder: str = "?") -> Property | None:
        self.check_alive(holder)
        yield_point(f"read {self._name}/{name}", self, write=False)
        return self._props.get(name)

    def value(self, name: str, holder: str = "?") -> bytes | None:
        p = self.prop(name, holder)
        return None if p is None else p.value

    def properties(self, holder: str = "?") -> list[Property]:
        self.check_alive(holder)
        return list(self._props.values())

    def device_type(self, holder: str = "?") -> str | None:
        v = self.value("device_type", holder)
        return None if v is None else v.rstrip(b"\0").decode("latin-1")

    def children(self) -> Iterator[DeviceNode]:
        """Uncounted iteration (for code holding the tree consistent, e.g. the exporter)."""
        c = self.child
        while c is not None:
            yield c
            c = c.sibling

    def child_by_name(self, name: str) -> DeviceNode | None:
        return None if self._child_names is None else self._child_names.get(name)

    @property
    def detached(self) -> bool:
        return NodeFlag.DETACHED in self.flags

    def path(self) -> str:
        """Full path (``%pOF``), following ``parent`` without counting (debug printing)."""
        parts: list[str] = []
        n: DeviceNode | None = self
        while n is not None and n.parent is not None:
            parts.append(n._name)
            n = n.parent
        return "/" + "/".join(reversed(parts))

    # -- structure: used by DeviceTree and TreeBuilder; no references, no notifications ----

    @classmethod
    def make_root(cls) -> DeviceNode:
        """The root node: its basename is empty, as in an FDT."""
        node = cls("root")
        node._name = ""
        return node

    def has_property(self, name: str) -> bool:
        """Uncounted check (builders, importers)."""
        return name in self._props

    def store_property(self, prop: Property) -> Property | None:
        """Replace-or-add ``prop``; returns the value it replaced."""
        old = self._props.get(prop.name)
        self._props[prop.name] = prop
        return old

    def drop_property(self, name: str) -> Property | None:
        """Remove ``name``; returns the value removed (None: there was none)."""
        return self._props.pop(name, None)

    def _index_child(self, node: DeviceNode) -> None:
        if self._child_names is None:
            self._child_names = {}
        if node.name in self._child_names:
            self._dups += 1
        else:
            self._child_names[node.name] = node

    def link_last(self, node: DeviceNode) -> None:
        """Append ``node`` to this node's children (boot order)."""
        node.sibling = None
        node._prev = self._last
        if self._last is None:
            self.child = node
        else:
            self._last.sibling = node
        self._last = node
        self._index_child(node)

    def link_first(self, node: DeviceNode) -> None:
        """Make ``node`` this node's first child (``of_attach_node``)."""
        node._prev = None
        node.sibling = self.child
        if self.child is not None:
            self.child._prev = node
        else:
            self._last = node
        self.child = node
        self._index_child(node)

    def forget_children(self) -> None:
        """Drop the child list (an attached cc node's unlinked subtree, as the kernel)."""
        self.child = None
        self._last = None
        self._child_names = None
        self._dups = 0

    def unlink(self) -> None:
        """Take this node out of its parent's child list; ``parent`` is kept."""
        parent = self.parent
        assert parent is not None
        if self._prev is None:
            parent.child = self.sibling
        else:
            self._prev.sibling = self.sibling
        if self.sibling is None:
            parent._last = self._prev
        else:
            self.sibling._prev = self._prev
        self.sibling = None
        self._prev = None
        names = parent._child_names
        if names is None:
            return
        if names.get(self.name) is not self:
            parent._dups -= self.name in names
            return
        del names[self.name]
        if parent._dups:
            for other in parent.children():  # a same-named sibling takes the name over
                if other.name == self.name:
                    names[self.name] = other
                    parent._dups -= 1
                    break

    def __repr__(self) -> str:
        state = "freed" if self.released else ("detached" if self.detached else "live")
        return f"<DeviceNode {self.path()} ph={self.phandle:#x} ref={self.refcount} {state}>"


def phandle_of(node: DeviceNode) -> int:
    for key in PHANDLE_PROPS:
        p = node._props.get(key)
        if p is not None and len(p.value) == 4:
            return int.from_bytes(p.value, "big")
    return 0


Canonical = tuple[str, tuple[tuple[str, bytes], ...], tuple[object, ...]]


def canonical(node: DeviceNode) -> Canonical:
    """Order-insensitive structure (children sorted by name, properties by name).

    The kernel links an attached node first among its siblings, so sibling order after
    an update is not the firmware's; this is what "the tree equals the description" means.
    """
    props = tuple(sorted((p.name, p.value) for p in node._props.values()))
    kids = tuple(sorted((canonical(c) for c in node.children()), key=lambda k: k[0]))
    return (node.name, props, kids)
