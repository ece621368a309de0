"""The slice of a device tree the IOMMU probe reads: ``iommus``, ``#iommu-cells``,
``iommu-map``/``iommu-map-mask``, ``status`` and ``ats-supported``.

Properties hold Python values: ``iommus`` is a flat list of cells where a phandle cell is
the target :class:`DtNode` itself (``[smmu, 23, smmu, 24]``); ``iommu-map`` is a list of
``(rid_base, iommu_node, out_base, length)`` tuples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmferry.hw.iommu.errors import Errno

#: of.h MAX_PHANDLE_ARGS in current kernels (8 in old ones)
MAX_PHANDLE_ARGS = 16


@dataclass(eq=False)
class DtNode:
    name: str
    props: dict[str, object] = field(default_factory=dict)
    phandle: int = 0

    @property
    def available(self) -> bool:
        """``status`` absent, ``"okay"`` or ``"ok"``."""
        return self.props.get("status", "okay") in ("okay", "ok")

    def cells(self, prop: str) -> int | None:
        value = self.props.get(prop)
        return value if isinstance(value, int) else None

    def __repr__(self) -> str:
        return f"DtNode({self.name!r})"


@dataclass(frozen=True)
class PhandleArgs:
    """``struct of_phandle_args``: the target node and its specifier cells."""

    np: DtNode
    args: tuple[int, ...]

    @property
    def args_count(self) -> int:
        return len(self.args)


def parse_phandle_with_args(
    node: DtNode, list_name: str, cells_name: str, index: int
) -> PhandleArgs | int:
    """The ``index``-th ``<phandle args...>`` entry of ``list_name``.

    Returns the entry, -ENOENT past the end, or -EINVAL for a malformed entry (not a
    phandle where one is expected, target without ``cells_name``, too few cells, more
    than MAX_PHANDLE_ARGS arguments).
    """
    raw = node.props.get(list_name)
    if not isinstance(raw, list):
        return -Errno.ENOENT
    pos = 0
    for current in range(index + 1):
        if pos >= len(raw):
            return -Errno.ENOENT
        target = raw[pos]
        if not isinstance(target, DtNode):
            return -Errno.EINVAL
        count = target.cells(cells_name)
        if count is None or count > MAX_PHANDLE_ARGS or pos + 1 + count > len(raw):
            return -Errno.EINVAL
        args = raw[pos + 1 : pos + 1 + count]
        if not all(isinstance(a, int) for a in args):
            return -Errno.EINVAL
        if current == index:
            return PhandleArgs(target, tuple(int(a) for a in args))
        pos += 1 + count
    return -Errno.ENOENT


def map_id(bridge: DtNode, rid: int) -> PhandleArgs | int:
    """``of_map_id`` through ``iommu-map``: the IOMMU and output ID for ``rid``.

    The input is masked with ``iommu-map-mask`` (default all ones).  -ENODEV when no
    entry covers it ("no IOMMU"), -EINVAL for a malformed map.
    """
    entries = bridge.props.get("iommu-map")
    if not isinstance(entries, list):
        return -Errno.ENODEV
    mask = bridge.props.get("iommu-map-mask", 0xFFFFFFFF)
    masked = rid & mask if isinstance(mask, int) else rid
    for entry in entries:
        if not (isinstance(entry, tuple) and len(entry) == 4):
            return -Errno.EINVAL
        base, target, out_base, length = entry
        if not isinstance(target, DtNode):
            return -Errno.EINVAL
        if base <= masked < base + length:
            return PhandleArgs(target, (out_base + masked - base,))
    return -Errno.ENODEV
