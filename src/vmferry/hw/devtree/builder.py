"""The public way to build a device tree: boot-time unflattening and unlinked subtrees.

A live tree changes only through :class:`~vmferry.hw.devtree.tree.DeviceTree`'s counted,
locked and notifying operations (``attach``, ``update_property``, changesets).  Before a
tree is live -- unflattening an FDT, generating a platform tree, numbering a QEMU tree's
phandles -- and while a configure-connector client assembles an unlinked subtree, nodes
are built without references, locks or notifications.  :class:`TreeBuilder` is that
construction interface, so no importer or client writes a node's private fields.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmferry.hw.devtree.node import PHANDLE_PROPS, DeviceNode, DevtreeError, Property
from vmferry.hw.devtree.tree import DeviceTree


class TreeBuilder:
    """Builds nodes of ``tree`` without notifications (boot time, unlinked subtrees)."""

    __slots__ = ("tree",)

    def __init__(self, tree: DeviceTree) -> None:
        self.tree = tree

    def set_root_properties(self, props: Iterable[Property]) -> None:
        """Give the root its properties (refused twice) and index its phandle."""
        for prop in props:
            self.add_property(self.tree.root, prop)
        self.tree.index_phandle(self.tree.root)

    def add_child(self, parent: DeviceNode, name: str,
                  props: Iterable[Property] = ()) -> DeviceNode:
        """A boot node appended below ``parent``, attached and in sysfs.

        Raises :class:`DevtreeError` for a duplicate node or property name.
        """
        node = self.tree.add_boot_node(parent, name)
        for prop in props:
            self.add_property(node, prop)
        self.tree.index_phandle(node)
        return node

    def new_unlinked(self, name: str) -> DeviceNode:
        """A dynamic node not yet in the tree (configure-connector); refcount 1."""
        return self.tree.new_node(name)

    def add_property(self, node: DeviceNode, prop: Property) -> None:
        """Add ``prop``; a property of that name already present is a :class:`DevtreeError`."""
        if node.has_property(prop.name):
            raise DevtreeError(f"node {node.name!r} has property {prop.name!r} twice")
        self.set_property(node, prop)

    def set_property(self, node: DeviceNode, prop: Property) -> None:
        """Replace-or-add ``prop`` without a notification; a phandle is re-indexed."""
        node.store_property(prop)
        if prop.name in PHANDLE_PROPS and node.in_sysfs:
            self.tree.index_phandle(node)
