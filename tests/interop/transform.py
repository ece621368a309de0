"""Documented, reproducible transformations of real QEMU streams (for fixtures and tests).

* :func:`add_firmware_registers` -- a QEMU arm64 stream with KVM firmware
  pseudo-registers can only be written by QEMU under KVM on an arm64 host.  This takes a
  real TCG ``virt`` stream and inserts firmware registers into the ``cpu`` section's
  register list exactly as QEMU lays it out: ``cpreg_vmstate_array_len`` grows, the ids
  go into ``cpreg_vmstate_indexes`` in ascending order with their values at the same
  positions of ``cpreg_vmstate_values``, and the JSON VM description's ``array_len`` of
  both arrays (and its length prefix) is rewritten to match.  Nothing else changes.
* :func:`set_tce_entries` -- overwrite entries of one ``spapr_iommu`` window's
  ``mig_table`` in place (big-endian u64, as QEMU writes them): what a guest's
  H_PUT_TCE calls would have left there.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

from vmferry.interop.qemu import read_stream


def add_firmware_registers(data: bytes, regs: Mapping[int, int]) -> bytes:
    s = read_stream(data, payloads=False)
    assert s.description is not None and s.description_offset is not None
    cpus = [x for x in s.sections.values() if x.idstr == "cpu"]
    assert len(cpus) == 1, "one vCPU streams only"
    f = cpus[0].fields
    n_field, idx, val = (f["cpreg_vmstate_array_len"], f["cpreg_vmstate_indexes"],
                         f["cpreg_vmstate_values"])
    assert val.offset == idx.offset + idx.nbytes and n_field.offset + 4 == idx.offset
    ids = struct.unpack_from(f">{idx.count}Q", data, idx.offset)
    values = struct.unpack_from(f">{val.count}Q", data, val.offset)
    merged = dict(zip(ids, values, strict=True))
    assert not set(regs) & set(merged), "register already in the list"
    merged.update(regs)
    order = sorted(merged)
    n = len(order)
    body = (data[:n_field.offset] + struct.pack(">I", n)
            + struct.pack(f">{n}Q", *order) + struct.pack(f">{n}Q", *(merged[r] for r in order))
            + data[val.offset + val.nbytes:s.description_offset])
    desc = s.description
    for dev in desc["devices"]:
        if dev["name"] == "cpu":
            for fd in dev["fields"]:
                if fd["name"] in ("cpreg_vmstate_indexes", "cpreg_vmstate_values"):
                    fd["array_len"] = n
    text = json.dumps(desc).encode()
    return body + b"\x06" + struct.pack(">I", len(text)) + text


def set_tce_entries(data: bytes, liobn: int, entries: Mapping[int, int]) -> bytes:
    s = read_stream(data)
    table = next(t for t in s.tce_tables if t.window.liobn == liobn)
    assert table.entries_offset is not None
    out = bytearray(data)
    for index, value in entries.items():
        assert 0 <= index < table.window.nb_table
        struct.pack_into(">Q", out, table.entries_offset + 8 * index, value)
    return bytes(out)
