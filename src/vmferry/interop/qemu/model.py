"""What a QEMU stream holds, as frozen records (the reader's output).

Device payloads are not re-modelled here: TCE windows are
:class:`vmferry.hw.spapr.persist.WindowState`, the device tree a
:class:`vmferry.hw.devtree.DeviceTree`, cpu register lists a
:class:`vmferry.machine.arm64.CpregList`.  These records only say *where* in the stream
each thing was (section, byte offset), so every check can name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmferry.hw.devtree import DeviceTree
from vmferry.hw.kvm import regs as R
from vmferry.hw.spapr.persist import WindowState
from vmferry.machine.arm64 import CpregList


@dataclass(frozen=True)
class Field:
    """One vmstate field as it sits in the stream: ``count`` elements of ``size`` bytes."""

    name: str
    type: str
    offset: int
    size: int
    count: int = 1

    @property
    def nbytes(self) -> int:
        return self.size * self.count


@dataclass
class Section:
    """One section (all its START/PART/END pieces for an iterative one)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int  # of its first header byte
    kind: str  # "ram", "htab", "vmstate", "opaque"
    bytes: int = 0  # headers, data and footers of every piece
    parts: int = 0
    ended: bool = False
    vmsd_name: str = ""
    fields: dict[str, Field] = field(default_factory=dict)
    subsections: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"idstr": self.idstr, "instance_id": self.instance_id,
                "version_id": self.version_id, "bytes": self.bytes, "offset": self.offset,
                "section_id": self.section_id, "kind": self.kind, "parts": self.parts,
                "fields": len(self.fields), "subsections": list(self.subsections)}


@dataclass
class RamBlock:
    name: str
    length: int
    zero_pages: int = 0
    normal_pages: int = 0


@dataclass
class RamSummary:
    page_size: int
    total: int = 0
    blocks: dict[str, RamBlock] = field(default_factory=dict)
    zero_pages: int = 0
    normal_pages: int = 0
    xbzrle_pages: int = 0
    compressed_pages: int = 0
    nonzero_fill: int = 0  # ZERO records whose fill byte was not 0
    passes: int = 0  # EOS markers

    def to_json(self) -> dict[str, Any]:
        return {
            "page_size": self.page_size, "total": self.total,
            "blocks": [{"name": b.name, "length": b.length, "zero_pages": b.zero_pages,
                        "normal_pages": b.normal_pages} for b in self.blocks.values()],
            "zero_pages": self.zero_pages, "normal_pages": self.normal_pages,
            "xbzrle_pages": self.xbzrle_pages, "compressed_pages": self.compressed_pages,
            "nonzero_fill": self.nonzero_fill, "eos_markers": self.passes,
        }


@dataclass
class HtabSummary:
    """``spapr/htab``: the hashed page table's size and the chunks of entries sent."""

    shift: int | None = None  # None: no HPT (-1 header; radix guest)
    chunks: int = 0
    valid: int = 0
    invalid: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"htab_shift": self.shift, "chunks": self.chunks, "valid_hptes": self.valid,
                "invalid_hptes": self.invalid}


@dataclass(frozen=True)
class TceTable:
    """One ``spapr_iommu`` section: the guest view of a DMA window."""

    section: str
    instance_id: int
    entries_offset: int | None  # byte offset of entry 0 in the stream (None: no table)
    window: WindowState
    bypass: bool
    ex_subsection: bool  # window offset and page shift came from "spapr_iommu_ex"

    def to_json(self) -> dict[str, Any]:
        values = self.window.values()
        return {"section": self.section, "instance_id": self.instance_id,
                "liobn": self.window.liobn, "liobn_hex": f"{self.window.liobn:#x}",
                "bus_offset": self.window.bus_offset, "page_shift": self.window.page_shift,
                "window_size": self.window.nb_table << self.window.page_shift,
                "from_stream": ["bus_offset", "page_shift"] if self.ex_subsection else [],
                "entries": self.window.nb_table, "nonzero_entries": int((values != 0).sum()),
                "entries_offset": self.entries_offset, "bypass": self.bypass}


@dataclass(frozen=True)
class StreamDeviceTree:
    """The FDT QEMU's pseries machine keeps in its ``spapr_dtb`` subsection."""

    section: str
    offset: int
    blob: bytes
    initial_size: int
    tree: DeviceTree

    def to_json(self) -> dict[str, Any]:
        nodes = list(self.tree.walk())
        return {"section": self.section, "offset": self.offset, "bytes": len(self.blob),
                "initial_size": self.initial_size, "nodes": len(nodes),
                "properties": sum(len(n.properties("inspect")) for n in nodes)}


@dataclass(frozen=True)
class CpuRegisters:
    """One arm64 ``cpu`` section's register list (``cpreg_vmstate_*``)."""

    section: str
    instance_id: int
    indexes_offset: int
    values_offset: int
    cpregs: CpregList

    def firmware(self) -> list[tuple[int, int, int]]:
        """(position in the list, register id, value) of each KVM firmware register."""
        return [(i, rid, v) for i, (rid, v) in enumerate(zip(self.cpregs.ids,
                                                             self.cpregs.values, strict=True))
                if R.is_firmware(rid)]

    def to_json(self) -> dict[str, Any]:
        fw = self.firmware()
        return {"section": self.section, "instance_id": self.instance_id,
                "count": len(self.cpregs.ids),
                "firmware_registers": [
                    {"name": R.register_name(rid), "id": f"{rid:#018x}", "value": v,
                     "value_hex": f"{v:#x}", "offset": self.values_offset + 8 * i}
                    for i, rid, v in fw],
                "note": "" if fw else ("no KVM firmware pseudo-registers in this list "
                                       "(a TCG stream carries none)")}


@dataclass
class QemuStream:
    """Everything :func:`vmferry.interop.qemu.read_stream` found, byte for byte."""

    version: int
    size: int
    machine: str = ""
    configuration: dict[str, Any] = field(default_factory=dict)
    sections: dict[int, Section] = field(default_factory=dict)
    order: list[tuple[str, int, int]] = field(default_factory=list)  # (type, section_id, off)
    ram: RamSummary | None = None
    htab: HtabSummary | None = None
    commands: list[tuple[int, int]] = field(default_factory=list)  # (cmd, offset)
    description: dict[str, Any] | None = None
    description_offset: int | None = None
    eof_offset: int | None = None
    accounted: int = 0
    tce_tables: list[TceTable] = field(default_factory=list)
    device_tree: StreamDeviceTree | None = None
    cpu_registers: list[CpuRegisters] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.eof_offset is not None and self.accounted == self.size

    def section_named(self, idstr: str) -> list[Section]:
        return [s for s in self.sections.values() if s.idstr == idstr]

    def to_json(self) -> dict[str, Any]:
        ram = self.ram.to_json() if self.ram else {"blocks": [], "zero_pages": 0,
                                                   "normal_pages": 0}
        out: dict[str, Any] = {
            "format": "qemu", "version": self.version, "size": self.size,
            "complete": self.complete, "machine": self.machine,
            "configuration": self.configuration, "ram": ram,
            "sections": [s.to_json() for s in self.sections.values()],
            "commands": [{"command": c, "offset": o} for c, o in self.commands],
            "description": None if self.description is None else {
                "offset": self.description_offset,
                "page_size": self.description.get("page_size"),
                "devices": len(self.description.get("devices", []))},
        }
        if self.htab is not None:
            out["htab"] = self.htab.to_json()
        if self.tce_tables:
            out["tce_tables"] = [t.to_json() for t in self.tce_tables]
        if self.device_tree is not None:
            out["device_tree"] = self.device_tree.to_json()
        if self.cpu_registers:
            out["cpu_registers"] = [c.to_json() for c in self.cpu_registers]
        return out
