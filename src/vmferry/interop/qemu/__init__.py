"""QEMU migration streams (``QEVM`` version 3), read into vmferry's models.

:func:`read_stream` decodes a whole stream held in a bytes-like object (sans-IO: the
caller maps or reads the file); :func:`check_stream` runs vmferry's checks on what it
carries (TCE tables, the pseries device tree, arm64 firmware registers).
"""

from vmferry.interop.qemu.check import Finding, check_stream
from vmferry.interop.qemu.model import (
    CpuRegisters,
    Field,
    HtabSummary,
    QemuStream,
    RamBlock,
    RamSummary,
    Section,
    StreamDeviceTree,
    TceTable,
)
from vmferry.interop.qemu.reader import find_description, is_qemu_stream, read_stream

__all__ = [
    "CpuRegisters",
    "Field",
    "Finding",
    "HtabSummary",
    "QemuStream",
    "RamBlock",
    "RamSummary",
    "Section",
    "StreamDeviceTree",
    "TceTable",
    "check_stream",
    "find_description",
    "is_qemu_stream",
    "read_stream",
]
