"""vmferry's checks on what a QEMU stream carries.

* **TCE tables** (``spapr_iommu``): each window is rebuilt in vmferry's sPAPR IOMMU model
  (:class:`~vmferry.hw.spapr.iommu.SpaprIommu` over guest RAM the size of the stream's
  ``ppc_spapr.ram`` block, the window as a :class:`~vmferry.hw.spapr.iommu.WindowSpec`)
  and every entry with permission bits goes through ``kvmppc_tce_validate``
  (:meth:`~vmferry.hw.spapr.kvm_hcalls.KvmTce.validate`): page-aligned address, inside
  guest RAM, backed by preregistered memory.  Entries without permission bits are
  no-access entries; a non-zero one is a poison value and is reported as a note.
* **Device tree** (``spapr`` / ``spapr_dtb``): loaded into the device-tree model; its
  reference counts and invariants are checked (:func:`~vmferry.machine.pseries_dt.
  tree_problems`); with a destination platform (``[lpm]`` table), the update plan that
  platform's firmware would send through ``ibm,update-nodes`` is computed
  (:func:`~vmferry.hw.spapr.rtas.compute_update_plan`) from the stream's tree to the tree
  the destination generates for a partition of the same memory and vCPUs.
* **arm64 firmware registers** (``cpu`` / ``cpreg_vmstate_*``): the stream's KVM firmware
  pseudo-registers are judged against a destination host profile by
  :func:`~vmferry.machine.arm64_compat.decide` -- the pre-flight decision ``vmferry
  matrix`` runs -- after probing the profile's one-reg interface
  (:func:`~vmferry.machine.arm64_compat.describe_destination`).

Each :class:`Finding` names the section, the byte offset and the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmferry.errors import ConfigError, GuestMemoryError, VmferryError
from vmferry.hw.devtree import DeviceTree
from vmferry.hw.kvm import regs as R
from vmferry.hw.spapr.hcall import HRet
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec
from vmferry.hw.spapr.platform import LMB_SIZES, generate_pseries_tree
from vmferry.hw.spapr.rtas import UpdatePlan, compute_update_plan
from vmferry.hw.spapr.tce import TCE_PERM_MASK, tce_address, tce_direction
from vmferry.interop.qemu.model import CpuRegisters, QemuStream, TceTable
from vmferry.machine.arm64 import Arm64State, Arm64VcpuState, CpregList
from vmferry.machine.arm64_compat import SourceState, Verdict, decide, describe_destination
from vmferry.machine.profiles import HostProfile
from vmferry.machine.pseries_dt import platform_params, tree_problems

#: entries reported one by one per window; the rest are counted
MAX_ENTRY_FINDINGS = 64
SPAPR_RAM = "ppc_spapr.ram"


@dataclass(frozen=True)
class Finding:
    check: str  # "tce", "device-tree", "lpm-update", "arm64-firmware"
    severity: str  # "error", "warning", "note", "ok"
    section: str
    offset: int | None
    value: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _NoMemory:
    """Guest RAM for the IOMMU model: only its size matters to TCE validation."""

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, gpa: int, n: int) -> bytes:
        raise GuestMemoryError(f"stream RAM is not loaded (read {n} at {gpa:#x})")

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        raise GuestMemoryError(f"stream RAM is not loaded (write at {gpa:#x})")


def check_stream(s: QemuStream, *, platform: Mapping[str, Any] | None = None,
                 profile: HostProfile | None = None) -> list[Finding]:
    """Run every check that applies to ``s``; ``platform`` is a host platform description
    (its ``lpm`` table), ``profile`` a destination arm64 host profile."""
    out: list[Finding] = []
    ram = guest_ram_size(s)
    for t in s.tce_tables:
        out += check_tce(t, ram)
    if s.device_tree is not None:
        out += check_device_tree(s, platform)
    for cpu in s.cpu_registers:
        out += check_firmware(cpu, profile)
    return out


def guest_ram_size(s: QemuStream) -> int:
    if s.ram is None or not s.ram.blocks:
        return 0
    block = s.ram.blocks.get(SPAPR_RAM) or max(s.ram.blocks.values(), key=lambda b: b.length)
    return block.length


# --- TCE ------------------------------------------------------------------------------------


def check_tce(t: TceTable, ram_size: int) -> list[Finding]:
    w = t.window
    where = f"spapr_iommu liobn {w.liobn:#x}"
    if w.nb_table == 0:
        return [Finding("tce", "ok", where, None, "0", "window disabled (no entries)")]
    try:
        spec = WindowSpec(w.liobn, w.bus_offset, w.nb_table << w.page_shift, w.page_shift)
        iommu = SpaprIommu(_NoMemory(ram_size), [spec])
    except (ConfigError, VmferryError) as exc:
        return [Finding("tce", "error", where, t.entries_offset,
                        f"offset={w.bus_offset:#x} shift={w.page_shift} n={w.nb_table}",
                        f"the window does not fit the TCE model: {exc}")]
    stt = iommu.kvm_tables.find(w.liobn)
    assert stt is not None
    values = w.values()
    live = np.flatnonzero(values & np.uint64(TCE_PERM_MASK))
    poison = np.flatnonzero((values != 0) & ((values & np.uint64(TCE_PERM_MASK)) == 0))
    out, bad = [], 0
    for i in live:
        tce = int(values[i])
        if iommu.kvm.validate(stt, tce) == HRet.H_SUCCESS:
            continue
        bad += 1
        if bad <= MAX_ENTRY_FINDINGS:
            out.append(Finding("tce", "error", where, _entry_offset(t, int(i)), f"{tce:#018x}",
                               f"entry {int(i)} (ioba {w.bus_offset + (int(i) << w.page_shift):#x},"
                               f" {tce_direction(tce).name}): {_why(tce, w.page_shift, ram_size)}"))
    if bad > MAX_ENTRY_FINDINGS:
        out.append(Finding("tce", "error", where, t.entries_offset, str(bad),
                           f"{bad - MAX_ENTRY_FINDINGS} more invalid entries"))
    for i in poison[:MAX_ENTRY_FINDINGS]:
        out.append(Finding("tce", "note", where, _entry_offset(t, int(i)),
                           f"{int(values[i]):#018x}", f"entry {int(i)}: no-access entry "
                           "with a non-zero value (a poison value H_GET_TCE returns)"))
    out.append(Finding("tce", "error" if bad else "ok", where, t.entries_offset,
                       f"{len(live)}/{w.nb_table}",
                       f"{len(live)} mapped entries, {bad} rejected by kvmppc_tce_validate, "
                       f"{len(poison)} poison; window {w.bus_offset:#x}+"
                       f"{w.nb_table << w.page_shift:#x}, {1 << w.page_shift} byte pages"))
    return out


def _entry_offset(t: TceTable, index: int) -> int | None:
    return None if t.entries_offset is None else t.entries_offset + 8 * index


def _why(tce: int, shift: int, ram: int) -> str:
    gpa = tce_address(tce)
    if gpa & ((1 << shift) - 1):
        return f"address {gpa:#x} not aligned to the {1 << shift} byte IOMMU page"
    if gpa + (1 << shift) > ram:
        return f"address {gpa:#x} outside guest RAM ({ram:#x} bytes)"
    return f"address {gpa:#x} not backed by preregistered memory"


# --- device tree ----------------------------------------------------------------------------


def check_device_tree(s: QemuStream, platform: Mapping[str, Any] | None) -> list[Finding]:
    dt = s.device_tree
    assert dt is not None
    where = "spapr/spapr_dtb fdt_blob"
    problems = tree_problems(dt.tree)
    nodes = sum(1 for _ in dt.tree.walk())
    out = [Finding("device-tree", "error", where, dt.offset, "", p) for p in problems]
    out.append(Finding("device-tree", "error" if problems else "ok", where, dt.offset,
                       f"{len(dt.blob)} bytes",
                       f"{nodes} nodes, {dt.tree.refcount_total()} references; "
                       + ("; ".join(problems) if problems else "reference counts balance")))
    if platform is not None:
        out += _lpm_plan(s, dt.tree, platform)
    return out


def _lpm_plan(s: QemuStream, tree: DeviceTree, platform: Mapping[str, Any]) -> list[Finding]:
    where = "spapr/spapr_dtb fdt_blob"
    assert s.device_tree is not None
    params = platform_params(platform.get("lpm", {}), "--platform [lpm]")
    mib = guest_ram_size(s) >> 20
    vcpus = max(1, sum(1 for x in s.sections.values() if x.idstr == "cpu"))
    lmb = next((size for size in reversed(LMB_SIZES) if (mib << 20) % size == 0), None)
    if lmb is None or mib == 0:
        return [Finding("lpm-update", "error", where, s.device_tree.offset, f"{mib} MiB",
                        "guest RAM is not a multiple of a 16 MiB LMB: no destination tree")]
    dest = generate_pseries_tree(mib, vcpus, lmb_size=lmb, **dataclasses.asdict(params))
    plan = compute_update_plan(tree, dest)
    return [*_plan_findings(plan, s.device_tree.offset),
            Finding("lpm-update", "note", where, s.device_tree.offset,
                    f"{len(plan.deletes)}/{len(plan.updates)}/{len(plan.adds)}",
                    f"ibm,update-nodes from a destination with {params.system_id} "
                    f"({mib} MiB, {vcpus} vCPUs): {len(plan.deletes)} deletes, "
                    f"{len(plan.updates)} updates, {len(plan.adds)} adds")]


def _plan_findings(plan: UpdatePlan, offset: int) -> list[Finding]:
    where = "spapr/spapr_dtb fdt_blob"
    out = [Finding("lpm-update", "note", where, offset, f"{ph:#x}", f"delete {path}")
           for ph, path in zip(plan.deletes, plan.delete_paths, strict=True)]
    out += [Finding("lpm-update", "note", where, offset, f"{u.phandle:#x}",
                    f"update {u.path}: {', '.join(c.name for c in u.changes)}")
            for u in plan.updates]
    out += [Finding("lpm-update", "note", where, offset, f"{a.parent_phandle:#x}",
                    f"add {a.subtree.name} ({a.subtree.count()} nodes, drc {a.drc_index:#x})")
            for a in plan.adds]
    return out


# --- arm64 firmware registers ---------------------------------------------------------------


def check_firmware(cpu: CpuRegisters, profile: HostProfile | None) -> list[Finding]:
    where = f"cpu {cpu.instance_id} cpreg_vmstate_values"
    fw = cpu.firmware()
    if not fw:
        return [Finding("arm64-firmware", "note", where, cpu.values_offset,
                        f"{len(cpu.cpregs.ids)} registers",
                        "no KVM firmware pseudo-registers in the register list (a TCG "
                        "stream carries none): nothing to judge against a host profile")]
    out = [Finding("arm64-firmware", "note", where, cpu.values_offset + 8 * i, f"{v:#x}",
                   f"{R.register_name(rid)} = {v:#x}") for i, rid, v in fw]
    if profile is None:
        return out
    dest = describe_destination(profile)
    incoming = CpregList(tuple(rid for _, rid, _ in fw), tuple(v for _, _, v in fw))
    state = Arm64State((Arm64VcpuState(cpu.instance_id, False, (), incoming),))
    decision = decide(SourceState("qemu-stream", state, None, {}), dest)
    reason = decision.reason
    if decision.verdict is Verdict.PROCEED and decision.register is None:
        reason = (f"{profile.name} (Linux {profile.kernel}) accepts every firmware register "
                  "value; the guest's boot-time view is not part of a QEMU stream")
    off = cpu.values_offset
    if decision.register is not None:
        off += 8 * next(i for i, rid, _ in fw if rid == decision.register)
    out.append(Finding("arm64-firmware", "ok" if decision.verdict is Verdict.PROCEED
                       else "error", where, off,
                       "" if decision.value is None else f"{decision.value:#x}",
                       f"{decision.verdict.value}: {reason}"))
    return out


__all__ = ["Finding", "check_device_tree", "check_firmware", "check_stream", "check_tce",
           "guest_ram_size"]
