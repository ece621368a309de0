"""Flattened device tree (.dtb) import and export through pylibfdt.

What a round trip preserves
---------------------------
* node order and property order exactly as in the blob (import appends in blob order;
  export writes children in ``child``/``sibling`` order and properties in insertion order);
* node names including unit addresses, raw property bytes (including empty properties);
* phandles: they are ordinary ``phandle``/``linux,phandle``/``ibm,phandle`` properties
  and are kept byte for byte; the live phandle cache is rebuilt from them;
* the memory reservation block (address, size pairs, in order) and ``boot_cpuid_phys``.

What it does not preserve: the string-table layout (libfdt's sequential writer
de-duplicates names in its own order), ``NOP`` tags, free space at the end of the blob
(``totalsize`` slack, as left by QEMU's ``fdt_open_into``) and the header's version fields
(we always write version 17, last compatible 16).  Hence a tree we export round-trips
byte-identically; a QEMU-produced blob round-trips structurally (:func:`structure`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import libfdt

from vmferry.errors import StreamDecodeError
from vmferry.hw.devtree.builder import TreeBuilder
from vmferry.hw.devtree.tree import DeviceNode, DeviceTree, Property
from vmferry.hw.persist import Field, Layout

_BOOT_CPUID_OFFSET = 28  # fdt_header.boot_cpuid_phys
#: the deepest tree import accepts (Linux's unflattening stops at FDT_MAX_DEPTH, 64)
MAX_DEPTH = 64


class FdtDecodeError(StreamDecodeError):
    """The bytes are not a valid flattened device tree."""


Structure = tuple[str, tuple[tuple[str, bytes], ...], tuple[Any, ...]]


def _check(fdt: Any, blob: bytes) -> None:
    try:
        rc = libfdt.fdt_check_full(bytearray(blob), len(blob))
    except Exception as exc:  # pylibfdt raises plain Exceptions for some inputs
        raise FdtDecodeError(f"fdt_check_full: {exc}") from exc
    if rc != 0:
        raise FdtDecodeError(f"invalid FDT: {libfdt.fdt_strerror(rc)}")
    del fdt


def load_fdt(blob: bytes | bytearray, *, observe: bool = False) -> DeviceTree:
    """Unflatten ``blob`` into a new tree of boot nodes (not ``DYNAMIC``)."""
    data = bytes(blob)
    if len(data) < 40:
        raise FdtDecodeError("FDT shorter than its header", offset=len(data))
    try:
        fdt = libfdt.FdtRo(bytearray(data))
    except libfdt.FdtException as exc:
        raise FdtDecodeError(f"FDT header rejected: {exc}") from exc
    _check(fdt, data)
    tree = DeviceTree(observe=observe)
    tree.boot_cpuid_phys = fdt.boot_cpuid_phys()
    tree.reservations = [tuple(fdt.get_mem_rsv(i))[-2:] for i in range(fdt.num_mem_rsv())]
    tree.reservations = [(int(a), int(s)) for a, s in tree.reservations]
    build = TreeBuilder(tree)
    _load_props(fdt, 0, build, tree.root)
    build.tree.index_phandle(tree.root)
    _load_children(fdt, 0, build, tree.root)
    return tree


def _ascii_name(get: Any, what: str, off: int) -> Any:
    """A name libfdt decodes, refused unless printable ASCII (the devicetree spec's
    character sets are ASCII; libfdt raises SystemError on other bytes)."""
    try:
        out = get(off)
    except (SystemError, UnicodeError, ValueError) as exc:
        raise FdtDecodeError(f"{what} is not ASCII", offset=off) from exc
    name = out if isinstance(out, str) else out.name
    if not all(0x20 < ord(c) < 0x7F for c in name):
        raise FdtDecodeError(f"{what} {name[:64]!r} has characters outside printable ASCII",
                             offset=off)
    return out


def _load_props(fdt: Any, off: int, build: TreeBuilder, node: DeviceNode) -> None:
    poff = fdt.first_property_offset(off, libfdt.QUIET_NOTFOUND)
    while poff >= 0:
        prop = _ascii_name(fdt.get_property_by_offset, "a property name", poff)
        if node.has_property(prop.name):
            raise FdtDecodeError(f"node {node.name!r} has property {prop.name!r} twice",
                                 offset=poff)
        build.set_property(node, Property(prop.name, bytes(prop)))
        poff = fdt.next_property_offset(poff, libfdt.QUIET_NOTFOUND)


def _load_children(fdt: Any, off: int, build: TreeBuilder, parent: DeviceNode) -> None:
    stack = [(off, parent, 0)]
    while stack:
        o, p, depth = stack.pop()
        kids: list[tuple[int, DeviceNode, int]] = []
        c = fdt.first_subnode(o, libfdt.QUIET_NOTFOUND)
        while c >= 0:
            if depth + 1 > MAX_DEPTH:
                raise FdtDecodeError(f"device tree deeper than {MAX_DEPTH} levels", offset=c)
            name = _ascii_name(fdt.get_name, "a node name", c)
            node = build.tree.add_boot_node(p, name)
            _load_props(fdt, c, build, node)
            build.tree.index_phandle(node)
            kids.append((c, node, depth + 1))
            c = fdt.next_subnode(c, libfdt.QUIET_NOTFOUND)
        stack.extend(reversed(kids))


def dump_fdt(tree: DeviceTree) -> bytes:
    """Flatten the reachable tree (deterministic: same tree -> same bytes)."""
    sw = libfdt.FdtSw(size_hint=_size_estimate(tree))
    for addr, size in tree.reservations:
        sw.add_reservemap_entry(addr, size)
    sw.finish_reservemap()
    _dump_node(sw, tree.root, "")
    fdt = sw.as_fdt()
    fdt.pack()
    out = bytearray(fdt.as_bytearray())
    struct.pack_into(">I", out, _BOOT_CPUID_OFFSET, tree.boot_cpuid_phys)
    return bytes(out)


def _size_estimate(tree: DeviceTree) -> int:
    """An upper bound of the blob size (pylibfdt's automatic growth is not reliable)."""
    total = 4096 + 16 * (len(tree.reservations) + 1)
    for n in tree.walk():
        total += 16 + len(n.name)
        total += sum(16 + len(p.value) + len(p.name) for p in n.properties("fdt"))
    return total


def _dump_node(sw: Any, node: DeviceNode, name: str) -> None:
    # explicit stack of (node, name, entering) keeps 100,000-deep chains off the C stack
    stack: list[tuple[DeviceNode, str, bool]] = [(node, name, True)]
    while stack:
        n, nm, entering = stack.pop()
        if not entering:
            sw.end_node()
            continue
        sw.begin_node(nm)
        for p in n.properties("fdt"):
            sw.property(p.name, p.value)
        stack.append((n, nm, False))
        kids = list(n.children())
        stack.extend((k, k.name, True) for k in reversed(kids))


def structure(tree: DeviceTree) -> tuple[Structure, tuple[tuple[int, int], ...], int]:
    """A comparable value: ordered nodes/properties, reservations, boot cpu."""
    def rec(n: DeviceNode) -> Structure:
        props = tuple((p.name, p.value) for p in n.properties("fdt"))
        return (n.name, props, tuple(rec(c) for c in n.children()))
    return rec(tree.root), tuple(tree.reservations), tree.boot_cpuid_phys


def fdt_structure(blob: bytes) -> tuple[Structure, tuple[tuple[int, int], ...], int]:
    """:func:`structure` computed straight from a blob with libfdt (independent path)."""
    fdt = libfdt.FdtRo(bytearray(blob))

    def rec(off: int) -> Structure:
        props: list[tuple[str, bytes]] = []
        poff = fdt.first_property_offset(off, libfdt.QUIET_NOTFOUND)
        while poff >= 0:
            p = fdt.get_property_by_offset(poff)
            props.append((p.name, bytes(p)))
            poff = fdt.next_property_offset(poff, libfdt.QUIET_NOTFOUND)
        kids: list[Structure] = []
        c = fdt.first_subnode(off, libfdt.QUIET_NOTFOUND)
        while c >= 0:
            kids.append(rec(c))
            c = fdt.next_subnode(c, libfdt.QUIET_NOTFOUND)
        return (fdt.get_name(off), tuple(props), tuple(kids))

    rsv = tuple((int(a), int(s)) for a, s in
                (tuple(fdt.get_mem_rsv(i))[-2:] for i in range(fdt.num_mem_rsv())))
    return rec(0), rsv, fdt.boot_cpuid_phys()


# --- persist contract: the guest's tree rides in the migration stream as a dtb -------------

#: the guest's tree in the stream (the persist codec of :mod:`vmferry.hw.persist`)
STATE_LAYOUT = Layout("device-tree", b"VFDT", 1, (Field("dtb", "bytes32"),))


class DevtreeStateError(FdtDecodeError):
    """A device-tree component record is malformed."""


@dataclass(frozen=True)
class TreeState:
    dtb: bytes


def save_tree(tree: DeviceTree) -> TreeState:
    return TreeState(dump_fdt(tree))


def restore_tree(state: TreeState) -> DeviceTree:
    return load_fdt(state.dtb)


def encode_state(state: TreeState) -> bytes:
    """``magic "VFDT" | u16 version | u32 length | dtb`` (:data:`STATE_LAYOUT`)."""
    return STATE_LAYOUT.encode({"dtb": state.dtb})


def decode_state(data: bytes) -> TreeState:
    try:
        blob = STATE_LAYOUT.decode(data)["dtb"]
    except StreamDecodeError as exc:  # one error type for every malformed tree record
        err = DevtreeStateError(str(exc))
        err.offset = exc.offset
        raise err from exc
    load_fdt(blob)  # validates
    return TreeState(blob)
