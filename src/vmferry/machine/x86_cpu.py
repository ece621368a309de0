"""The x86-64 vCPU state of a KVM VM in a migration, and pre-flight against the
destination's KVM.

:class:`X86CpuHandler` carries each vCPU's whole KVM state (REGS, SREGS, FPU, XSAVE, XCRS,
VCPU_EVENTS, MP_STATE, every MSR of ``KVM_GET_MSR_INDEX_LIST``) and the KVM clock in
records of their own and checks, before anything moves, that the destination's KVM can
take them: the MSRs it lists and does not refuse, the CPUID features it supports, the size
of its XSAVE area, the capabilities a migration needs.  What it knowingly drops
(:data:`DROPPABLE_MSRS`) goes ahead, listed in the job's report with the reason.

A host's ``--platform`` file may hold a ``[kvm]`` table: ``hide_msrs`` and
``refuse_msrs`` (MSR numbers this host pretends not to list, or to refuse in
``KVM_SET_MSRS``) and ``hide_cpuid`` (``"LEAF[.SUB]:REG:BIT"`` strings, CPUID bits this
host pretends its KVM lacks), to exercise the refusal path of pre-flight
(:class:`~vmferry.machine.schema.KvmPlatformModel`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmferry.errors import ConfigError, MalformedRecord, MigrationRefused
from vmferry.hw.x86 import kvm
from vmferry.hw.x86 import state as x86_state
from vmferry.hw.x86.kvm import CpuidEntry, Kvm
from vmferry.hw.x86.state import KvmClockState, X86VcpuState
from vmferry.machine.handlers import ArchState, MigrationHandler, StatePiece
from vmferry.machine.schema import KvmPlatformModel, check
from vmferry.machine.x86_ram import DIRTY_LOG_MODES

if TYPE_CHECKING:
    from vmferry.machine.x86 import X86Vm

#: MSRs a migration may knowingly leave behind, and why
DROPPABLE_MSRS: dict[int, str] = {
    kvm.MSR_KVM_POLL_CONTROL: "MSR_KVM_POLL_CONTROL: this KVM refuses it in KVM_SET_MSRS "
    "even with the value it just read; it only tunes halt polling (the guest loses "
    "nothing but that hint)",
}
MSR_NAMES = {kvm.MSR_KVM_POLL_CONTROL: "MSR_KVM_POLL_CONTROL", 0x10: "IA32_TSC",
             0x1B: "IA32_APIC_BASE", 0xC0000080: "IA32_EFER", 0xC0000081: "STAR",
             0xC0000082: "LSTAR", 0xC0000084: "SFMASK", 0xC0000102: "KERNEL_GS_BASE",
             0x174: "SYSENTER_CS", 0x175: "SYSENTER_ESP", 0x176: "SYSENTER_EIP",
             0x277: "IA32_PAT", 0x6E0: "IA32_TSC_DEADLINE", 0x1A0: "IA32_MISC_ENABLE",
             0x4B564D00: "MSR_KVM_WALL_CLOCK_NEW", 0x4B564D01: "MSR_KVM_SYSTEM_TIME_NEW",
             0x4B564D02: "MSR_KVM_ASYNC_PF_EN", 0x4B564D03: "MSR_KVM_STEAL_TIME",
             0x4B564D04: "MSR_KVM_PV_EOI_EN"}
CPUID_REGS = ("eax", "ebx", "ecx", "edx")
#: the CPUID registers that hold feature flags, which pre-flight compares (not leaf 1's
#: EBX, whose top byte is the APIC ID of whichever host CPU answered)
FEATURE_REGS: dict[tuple[int, int], tuple[str, ...]] = {
    (1, 0): ("ecx", "edx"), (7, 0): ("ebx", "ecx", "edx"), (7, 1): ("eax",),
    (0xD, 1): ("eax",), (0x80000001, 0): ("ecx", "edx"), (0x80000007, 0): ("edx",),
    (0x80000008, 0): ("ebx",),
}
#: feature bits that mirror guest control-register state rather than what KVM offers
DYNAMIC_BITS = {(1, 0, "ecx", 27), (7, 0, "ecx", 4)}  # OSXSAVE, OSPKE
CPUID_NAMES = {(1, "ecx", 0): "sse3", (1, "ecx", 9): "ssse3", (1, "ecx", 19): "sse4.1",
               (1, "ecx", 20): "sse4.2", (1, "ecx", 23): "popcnt", (1, "ecx", 25): "aes",
               (1, "ecx", 26): "xsave", (1, "ecx", 28): "avx", (1, "ecx", 30): "rdrand",
               (1, "edx", 25): "sse", (1, "edx", 26): "sse2", (7, "ebx", 3): "bmi1",
               (7, "ebx", 5): "avx2", (7, "ebx", 8): "bmi2", (7, "ebx", 16): "avx512f",
               (0x80000001, "edx", 20): "nx", (0x80000001, "edx", 29): "lm"}


def msr_name(index: int) -> str:
    name = MSR_NAMES.get(index)
    return f"MSR {index:#x}" + (f" ({name})" if name else "")


def cpuid_name(leaf: int, sub: int, reg: str, bit: int) -> str:
    name = CPUID_NAMES.get((leaf, reg, bit))
    where = f"CPUID {leaf:#x}" + (f".{sub}" if sub else "") + f" {reg} bit {bit}"
    return f"{where} ({name})" if name else where



# --- the host's KVM, with what a platform file hides ------------------------------------


@dataclass(frozen=True)
class KvmPlatform:
    hide_msrs: frozenset[int] = frozenset()
    refuse_msrs: frozenset[int] = frozenset()
    hide_cpuid: frozenset[tuple[int, int, str, int]] = frozenset()

    @classmethod
    def parse(cls, platform: Mapping[str, Any]) -> KvmPlatform:
        table = check(KvmPlatformModel, platform.get("kvm", {}), "platform [kvm]")
        return cls(frozenset(table.hide_msrs), frozenset(table.refuse_msrs),
                   frozenset(parse_cpuid_bit(b) for b in table.hide_cpuid))


def parse_cpuid_bit(spec: object) -> tuple[int, int, str, int]:
    """``"LEAF[.SUB]:REG:BIT"`` (``"7:ebx:5"``, ``"0xd.1:eax:0"``) as a tuple."""
    try:
        if not isinstance(spec, str):
            raise ValueError
        where, reg, bit = spec.lower().split(":")
        leaf_s, _, sub_s = where.partition(".")
        leaf, sub, b = int(leaf_s, 0), int(sub_s, 0) if sub_s else 0, int(bit, 0)
        if reg not in CPUID_REGS or not 0 <= b < 32:
            raise ValueError
    except ValueError:
        raise ConfigError(f"CPUID bit {spec!r} is not LEAF[.SUB]:REG:BIT") from None
    return leaf, sub, reg, b


class HostKvm:
    """This host's KVM as vmferry uses it: what it lists, supports and refuses."""

    def __init__(self, system: Kvm, platform: KvmPlatform) -> None:
        self.system = system
        self.platform = platform
        self.msrs = [m for m in system.msr_index_list() if m not in platform.hide_msrs]
        cpuid = system.supported_cpuid()
        self.cpuid = [_hide(e, platform.hide_cpuid) for e in cpuid]
        self.caps = system.capabilities()

    def xsave_size(self) -> int:
        return max(kvm.XSAVE_SIZE, self.caps.get("XSAVE2", 0))


def _hide(e: CpuidEntry, hidden: frozenset[tuple[int, int, str, int]]) -> CpuidEntry:
    regs = {r: e.reg(r) for r in CPUID_REGS}
    for leaf, sub, reg, bit in hidden:
        if e.function == leaf and e.index == sub:
            regs[reg] &= ~(1 << bit)
    return CpuidEntry(e.function, e.index, e.flags, **regs)


# --- migration: the whole vCPU state, checked against the destination ---------------


class X86CpuHandler(MigrationHandler):
    """Carries every vCPU's KVM state and the KVM clock; pre-flight against the
    destination's KVM."""

    name = "x86-cpu"
    arch_kinds = frozenset({"x86_vcpu", "kvm_clock"})

    def __init__(self, vm: X86Vm) -> None:
        self.vm = vm
        self.dropped: dict[int, str] = {}
        #: the guest's summed progress counter when its state was saved (vCPUs stopped)
        self.progress_at_stop: int | None = None
        self._checked = False
        #: the payload version of the saved state: what the destination reads
        self._write_version = x86_state.VERSION
        self._states: dict[int, X86VcpuState] = {}
        self._clock: KvmClockState | None = None

    def capabilities(self) -> dict[str, Any]:
        hk = self.vm.host_kvm
        return {
            "msrs": hk.msrs,
            "msrs_refused": self.vm.refused_msrs,
            "cpuid": [[e.function, e.index, e.eax, e.ebx, e.ecx, e.edx] for e in hk.cpuid],
            "xsave_size": kvm.XSAVE_SIZE,
            "caps": hk.caps,
            "state_version": x86_state.VERSION,
        }

    def preflight(self, destination: Mapping[str, Any] | None,
                  options: Mapping[str, Any]) -> list[str]:
        """Refuse what the destination's KVM cannot take; list what is knowingly dropped.
        Without the destination's word (a snapshot), the reference is this host's KVM: a
        snapshot is restored on a host of its kind."""
        self.dropped = {}
        self._checked = True
        self._write_version = x86_state.VERSION
        if options.get("compat") == "qemu":  # as QEMU: the destination finds out at load
            return []
        if destination is None:
            destination = self.capabilities()
        problems: list[str] = []
        warnings: list[str] = []
        try:  # a destination of an earlier release reads the earlier payload layout
            self._write_version = x86_state.write_version(destination.get("state_version"))
        except MalformedRecord as exc:
            problems.append(str(exc))
        caps = destination.get("caps", {})
        for name in kvm.REQUIRED_CAPABILITIES:
            if not caps.get(name):
                problems.append(f"destination KVM lacks KVM_CAP_{name}")
        listed = set(destination.get("msrs", []))
        refused = set(destination.get("msrs_refused", []))
        for m in self.vm.host_kvm.msrs:
            why = ("is not in the destination's KVM_GET_MSR_INDEX_LIST" if m not in listed
                   else "is refused by the destination's KVM_SET_MSRS (trial on a scratch "
                   "vCPU)" if m in refused else "")
            if not why:
                continue
            if m in DROPPABLE_MSRS:
                self.dropped[m] = f"{why}; dropped: {DROPPABLE_MSRS[m]}"
                warnings.append(f"{msr_name(m)} not migrated: {self.dropped[m]}")
            else:
                problems.append(f"{msr_name(m)} {why}")
        theirs = {(f, i): dict(zip(CPUID_REGS, regs, strict=True))
                  for f, i, *regs in destination.get("cpuid", [])}
        for e in self.vm.guest_cpuid:
            other = theirs.get((e.function, e.index), dict.fromkeys(CPUID_REGS, 0))
            for reg in FEATURE_REGS.get((e.function, e.index), ()):
                missing = e.reg(reg) & ~other[reg]
                for bit in range(32):
                    if missing >> bit & 1 and (e.function, e.index, reg, bit) not in DYNAMIC_BITS:
                        problems.append(f"{cpuid_name(e.function, e.index, reg, bit)}: the "
                                        "guest has it, the destination's "
                                        "KVM_GET_SUPPORTED_CPUID lacks it")
        if int(destination.get("xsave_size", 0)) < kvm.XSAVE_SIZE:
            problems.append(f"destination XSAVE area of {destination.get('xsave_size')} bytes "
                            f"cannot hold the guest's {kvm.XSAVE_SIZE}")
        if problems:
            raise MigrationRefused("destination KVM cannot take the guest's vCPU state: "
                                   + "; ".join(problems), "pre-flight")
        return warnings

    def save_complete(self) -> Sequence[StatePiece]:
        if not self._checked:  # no pre-flight (a snapshot): check against this host
            self.preflight(None, {})
        self.progress_at_stop = sum(c for c, _ in self.vm.progress())
        drop = frozenset(self.dropped)
        version = self._write_version
        pieces: list[StatePiece] = [ArchState("kvm_clock", self.vm.get_clock().encode(version))]
        for i in range(len(self.vm.kvm_vcpus)):
            pieces.append(ArchState("x86_vcpu", self.vm.save_state(i, drop).encode(version)))
        return pieces

    def save_cleanup(self) -> None:
        self._checked = False

    def save_failed(self) -> None:
        self._checked = False

    def load(self, piece: StatePiece) -> None:
        if not isinstance(piece, ArchState):
            raise MalformedRecord(f"{self.name} takes no {type(piece).__name__}")
        if piece.kind == "kvm_clock":
            if self._clock is not None:
                raise MalformedRecord("KVM clock sent twice")
            self._clock = KvmClockState.decode(piece.data)
            return
        st = X86VcpuState.decode(piece.data)
        if st.index in self._states or not 0 <= st.index < len(self.vm.kvm_vcpus):
            raise MalformedRecord(f"x86 state for vCPU {st.index} repeated or out of range")
        self._states[st.index] = st

    def load_complete(self) -> None:
        missing = sorted(set(range(len(self.vm.kvm_vcpus))) - set(self._states))
        if missing or self._clock is None:
            raise MalformedRecord(f"x86 state missing: vCPUs {missing}"
                                  + ("" if self._clock else ", KVM clock"))
        for st in self._states.values():
            self.vm.load_state(st)
        self.vm.set_clock(self._clock)
        self._states, self._clock = {}, None
        self.vm.write_mailbox()  # the rate in this host's TSC ticks, no throttle

    def load_failed(self) -> None:
        self._states, self._clock = {}, None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dirty_log": DIRTY_LOG_MODES[self.vm.dirty_log_mode]}
        if self.progress_at_stop is not None:
            out["progress_at_stop"] = self.progress_at_stop
        if self.dropped:
            out["dropped"] = {msr_name(m): why for m, why in self.dropped.items()}
        return out

    def state_digest(self) -> str | None:
        return None
