"""The device payloads vmferry models, read out of a decoded QEMU stream.

=================  ==========================================  ===========================
section            fields (QEMU 7.2 vmstate)                    vmferry model
=================  ==========================================  ===========================
``spapr_iommu``    ``liobn``, ``mig_nb_table``, ``bypass``,     ``hw.spapr.persist.
                   ``mig_table`` (big-endian u64 TCEs);          WindowState``
                   subsection ``spapr_iommu_ex``: ``bus_offset``,
                   ``page_shift`` (absent: 0 and 12)
``spapr``          subsection ``spapr_dtb``: ``fdt_initial_size``, ``hw.devtree.DeviceTree``
                   ``fdt_size``, ``fdt_blob`` (the guest's FDT)  (``load_fdt``)
``cpu`` (arm)      ``cpreg_vmstate_array_len`` (int32 LE),       ``machine.arm64.CpregList``
                   ``cpreg_vmstate_indexes`` / ``_values``
                   (u64, KVM register ids and values)
=================  ==========================================  ===========================
"""

from __future__ import annotations

import numpy as np

from vmferry.errors import MalformedRecord
from vmferry.hw.devtree import FdtDecodeError, load_fdt
from vmferry.hw.spapr.persist import WindowState
from vmferry.interop.qemu.model import (
    CpuRegisters,
    Field,
    QemuStream,
    Section,
    StreamDeviceTree,
    TceTable,
)
from vmferry.machine.arm64 import CpregList

#: SPAPR_TCE_PAGE_SHIFT: the default window's IOMMU page
DEFAULT_TCE_PAGE_SHIFT = 12


def field_int(buf: memoryview, sec: Section, name: str) -> int | None:
    """A scalar integer field.  Every vmstate integer is big-endian on the wire, including
    ``int32 le``: "le" there is *less or equal* (``VMSTATE_INT32_POSITIVE_LE``: the loaded
    value must be <= the destination's own), not little-endian."""
    f = sec.fields.get(name)
    if f is None:
        return None
    if f.count != 1 or f.size not in (1, 2, 4, 8):
        raise MalformedRecord(f"QEMU stream: field {name} of {sec.idstr!r} is not a scalar "
                              f"integer ({f.count} x {f.size} bytes)", f.offset)
    signed = f.type.startswith("int")
    return int.from_bytes(buf[f.offset:f.offset + f.size], "big", signed=signed)


def _u64_array(buf: memoryview, f: Field, sec: Section) -> np.ndarray:
    if f.size != 8:
        raise MalformedRecord(f"QEMU stream: field {f.name} of {sec.idstr!r}: expected "
                              f"8-byte elements, found {f.size}", f.offset)
    return np.frombuffer(buf, dtype=">u8", count=f.count, offset=f.offset)


def extract_payloads(buf: memoryview, s: QemuStream) -> None:
    for sec in s.sections.values():
        if sec.kind != "vmstate":
            continue
        if sec.idstr == "spapr_iommu":
            s.tce_tables.append(_tce_table(buf, sec))
        elif sec.idstr == "spapr" and "spapr_dtb.fdt_blob" in sec.fields:
            s.device_tree = _device_tree(buf, sec)
        elif sec.idstr == "cpu" and "cpreg_vmstate_indexes" in sec.fields:
            s.cpu_registers.append(_cpu_registers(buf, sec))


def _tce_table(buf: memoryview, sec: Section) -> TceTable:
    liobn = field_int(buf, sec, "liobn")
    nb = field_int(buf, sec, "mig_nb_table")
    if liobn is None or nb is None:
        raise MalformedRecord(f"QEMU stream: spapr_iommu section (instance "
                              f"{sec.instance_id}) without liobn/mig_nb_table", sec.offset)
    ex = "spapr_iommu_ex.page_shift" in sec.fields
    shift = field_int(buf, sec, "spapr_iommu_ex.page_shift") if ex else DEFAULT_TCE_PAGE_SHIFT
    bus = field_int(buf, sec, "spapr_iommu_ex.bus_offset") if ex else 0
    assert shift is not None and bus is not None
    table = sec.fields.get("mig_table")
    got = 0 if table is None else table.count
    if got != nb:
        raise MalformedRecord(f"QEMU stream: spapr_iommu liobn {liobn:#x}: mig_nb_table says "
                              f"{nb} entries, mig_table holds {got}",
                              table.offset if table else sec.offset)
    entries = b"" if table is None else bytes(buf[table.offset:table.offset + table.nbytes])
    bypass = field_int(buf, sec, "bypass")
    return TceTable(sec.idstr, sec.instance_id, None if table is None else table.offset,
                    WindowState(liobn, bus, shift, nb, entries), bool(bypass), ex)


def _device_tree(buf: memoryview, sec: Section) -> StreamDeviceTree:
    f = sec.fields["spapr_dtb.fdt_blob"]
    blob = bytes(buf[f.offset:f.offset + f.nbytes])
    size = field_int(buf, sec, "spapr_dtb.fdt_size")
    if size is not None and size != len(blob):
        raise MalformedRecord(f"QEMU stream: spapr_dtb fdt_size {size} but fdt_blob holds "
                              f"{len(blob)} bytes", f.offset)
    try:
        tree = load_fdt(blob)
    except FdtDecodeError as exc:
        raise MalformedRecord(f"QEMU stream: spapr_dtb fdt_blob of section 'spapr' is not a "
                              f"valid device tree: {exc}", f.offset) from exc
    initial = field_int(buf, sec, "spapr_dtb.fdt_initial_size") or 0
    return StreamDeviceTree(sec.idstr, f.offset, blob, initial, tree)


def _cpu_registers(buf: memoryview, sec: Section) -> CpuRegisters:
    n = field_int(buf, sec, "cpreg_vmstate_array_len")
    idx, val = sec.fields["cpreg_vmstate_indexes"], sec.fields.get("cpreg_vmstate_values")
    if val is None or n is None or not idx.count == val.count == n:
        raise MalformedRecord(
            f"QEMU stream: cpu {sec.instance_id}: cpreg_vmstate_array_len {n} does not match "
            f"its index and value arrays ({idx.count}, {val.count if val else None})",
            idx.offset)
    ids = tuple(int(x) for x in _u64_array(buf, idx, sec))
    values = tuple(int(x) for x in _u64_array(buf, val, sec))
    return CpuRegisters(sec.idstr, sec.instance_id, idx.offset, val.offset,
                        CpregList(ids, values))


__all__ = ["extract_payloads", "field_int"]
