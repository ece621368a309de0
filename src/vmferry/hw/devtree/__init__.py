"""Live device tree with OF-core lifetime rules, and FDT import/export."""

from vmferry.hw.devtree.builder import TreeBuilder
from vmferry.hw.devtree.fdt import FdtDecodeError, dump_fdt, fdt_structure, load_fdt, structure
from vmferry.hw.devtree.tree import (
    BadPut,
    Changeset,
    DeviceNode,
    DeviceTree,
    DevtreeError,
    HazardRecord,
    LeakRecord,
    NodeFlag,
    Property,
    Reconfig,
    ReconfigEvent,
    RefcountUnderflow,
)

__all__ = [
    "BadPut",
    "Changeset",
    "DeviceNode",
    "DeviceTree",
    "DevtreeError",
    "FdtDecodeError",
    "HazardRecord",
    "LeakRecord",
    "NodeFlag",
    "Property",
    "Reconfig",
    "ReconfigEvent",
    "RefcountUnderflow",
    "TreeBuilder",
    "dump_fdt",
    "fdt_structure",
    "load_fdt",
    "structure",
]
