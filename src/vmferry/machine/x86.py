"""x86-64 VMs on Linux KVM: ``arch = "x86_64"`` builds a real VM.

An :class:`X86Vm` owns a KVM VM fd, one memory slot over its guest RAM (anonymous memory
in 4 KiB pages, always dirty-logged by KVM) and one KVM vCPU fd per vCPU.  Each vCPU runs
the guest program of :mod:`vmferry.guest.x86` at CPL3 in long mode, entered directly
through ``KVM_SET_SREGS``.  Nothing is simulated: guest memory is written by guest
instructions, and the dirty log comes from KVM.

The threads that call ``KVM_RUN`` belong to the host (this layer starts none): a
:class:`VcpuThreads` given in :attr:`HostContext.vcpu_threads` runs
:meth:`X86Vm.vcpu_step` in a loop per vCPU and stops the vCPUs the way KVM wants
(``immediate_exit`` plus a signal to the thread; then :meth:`X86Vm.complete_exits` re-enters
each vCPU once so KVM finishes its last exit before state is read).

The migration engine sees the same interface as for a modelled VM: ``vm.ram`` with its
dirty log (:class:`KvmGuestRam` reads KVM's), ``save_vcpus``/``restore_vcpus`` and the
handler :class:`X86CpuHandler`, which carries each vCPU's whole KVM state and the KVM
clock in records of their own and checks, before anything moves, that the destination's
KVM can take them.

Definition keys beyond the common ones: ``dirty_log`` = ``"get"`` (``KVM_GET_DIRTY_LOG``,
the default) or ``"manual-protect"`` (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: GET, then
CLEAR of the pages read).  A host's ``--platform`` file may hold a ``[kvm]`` table:
``hide_msrs`` and ``refuse_msrs`` (MSR numbers this host pretends not to list, or to
refuse in ``KVM_SET_MSRS``) and ``hide_cpuid`` (``"LEAF[.SUB]:REG:BIT"`` strings, CPUID
bits this host pretends its KVM lacks), to exercise the refusal path of pre-flight.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from vmferry.errors import ConfigError, MalformedRecord, MigrationRefused, ModelError
from vmferry.guest.workload import Workload
from vmferry.guest.x86 import program as prog
from vmferry.hw.x86 import kvm
from vmferry.hw.x86.kvm import CpuidEntry, Kvm, KvmError, KvmVcpu
from vmferry.hw.x86.longmode import REG_NAMES, long_mode_sregs, pack_regs, unpack_regs
from vmferry.hw.x86.state import KvmClockState, X86VcpuState
from vmferry.machine.handlers import ArchState, MigrationHandler, StatePiece
from vmferry.machine.ram import PAGE_4K, DirtyLog, GuestRam
from vmferry.machine.schema import ARCH_KEYS, KvmPlatformModel, check, x86_keys
from vmferry.machine.vcpu import VcpuState
from vmferry.machine.vm import ARCHES, VM, ArchSupport, HostContext, VmDefinition

ARCH = "x86_64"
KEYS = ARCH_KEYS[ARCH]
DIRTY_LOG_MODES = {"get": "KVM_GET_DIRTY_LOG",
                   "manual-protect": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (GET + CLEAR)"}
SLOT = 0
IDLE_SLEEP_S = 0.02
MIN_SLEEP_S = 0.001
MAX_SLEEP_S = 0.02

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


def kvm_status() -> dict[str, Any]:
    """Whether this host can run x86-64 guests on KVM, and why not."""
    usable, why = kvm.kvm_usable()
    return {"usable": usable, "reason": why}


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


# --- guest RAM with KVM's dirty log ------------------------------------------------------


class KvmGuestRam(GuestRam):
    """Guest RAM in 4 KiB pages (no transparent huge pages: first touch of THP memory is
    slow on the hosts vmferry targets) whose dirty log is KVM's.

    The memory slot is dirty-logged from creation.  ``start_dirty_log`` reads and drops
    the log once; ``get_dirty_log`` reads KVM's bitmap (and, in manual-protect mode,
    clears exactly the pages read), adding what the VMM itself wrote (KVM never logs
    those).  The guest writes pages behind the VMM's back, so no page counts as zero
    without a look."""

    def __init__(self, size: int) -> None:
        super().__init__(size, PAGE_4K, huge_pages=False)
        self.kvm_vm: kvm.KvmVm | None = None
        self.mode = "get"
        self.reads = 0
        self.pages_reported = 0
        #: (guest time, pages) of the last reads, for the observed dirty rate
        self.history: list[tuple[float, int]] = []
        self.now: Callable[[], float] = lambda: 0.0

    @property
    def address(self) -> int:
        return int(self.bytes.ctypes.data)

    def populate(self, first: int, count: int) -> bool:
        """Fault pages ``[first, first + count)`` in, writable, without touching their
        contents (``MADV_POPULATE_WRITE``): a destination populated ahead of the stream
        takes pages much faster.  False if this kernel cannot."""
        if first < 0 or count <= 0 or first + count > self.npages:
            return False
        return kvm.populate_write(self.address + first * self.page_size,
                                  count * self.page_size)

    def attach(self, vm: kvm.KvmVm, mode: str) -> None:
        self.kvm_vm = vm
        self.mode = mode
        vm.set_memory(SLOT, 0, self.size, self.address, kvm.MEM_LOG_DIRTY_PAGES)

    def _read_kvm(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        if self.kvm_vm is None:
            return np.zeros(self.npages, dtype=np.bool_)
        words = self.kvm_vm.get_dirty_log(SLOT, self.npages)
        if self.mode == "manual-protect" and words.any():
            self.kvm_vm.clear_dirty_log(SLOT, 0, self.npages, words)
        self.reads += 1
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.npages]
        return bits.view(np.bool_)

    def start_dirty_log(self) -> None:
        self._read_kvm()
        super().start_dirty_log()

    def get_dirty_log(self) -> DirtyLog:
        from_kvm = self._read_kvm()  # KVM's get-and-clear is atomic against the guest
        with self.log_guard:  # and the VMM's own marks are taken the same way
            from_vmm, self.dirty = self.dirty, np.zeros(self.npages, dtype=np.bool_)
        bitmap = from_kvm | from_vmm
        count = int(np.count_nonzero(bitmap))
        self.pages_reported += count
        self.history.append((self.now(), count))
        del self.history[:-8]
        return DirtyLog(self.page_size, bitmap)

    def zero_mask_at(self, index: np.ndarray[Any, np.dtype[np.int64]]
                     ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        words = self.bytes.view(np.uint64).reshape(self.npages, self.page_size // 8)
        mask = np.zeros(index.size, dtype=np.bool_)
        suspects = np.flatnonzero(words[index, 0] == 0)
        if suspects.size:
            mask[suspects] = ~words[index[suspects]].any(axis=1)
        return mask


class VcpuThreads(Protocol):
    """Runs a VM's vCPUs in threads (provided by the host)."""

    def start(self) -> None:
        """Start one thread per vCPU, each calling ``vm.vcpu_step(i)`` until stopped."""

    def stop(self) -> None:
        """Stop every vCPU (``vm.request_stop(i)`` and a signal to its thread) and join."""


class KvmWorkload(Workload):
    """The workload of a real guest: the guest program does the writing; the host only
    writes the rate (scaled by the auto-converge throttle) into the mailbox."""

    def __init__(self, vm: X86Vm) -> None:
        super().__init__(vm.definition.workload, vm.ram)
        self.vm = vm

    def set_throttle(self, pct: int) -> None:
        super().set_throttle(pct)
        self.vm.write_mailbox()

    def run(self, seconds: float) -> int:
        return 0

    @property
    def pages_written(self) -> int:
        return sum(c for c, _ in self.vm.progress())

    @pages_written.setter
    def pages_written(self, value: int) -> None:
        pass


class GuestCrashed(ModelError):
    """The guest left the program (a triple fault, an emulation failure, a stray exit)."""


@dataclass
class _Rates:
    window_start: float = 0.0
    exits: int = 0
    progress: int = 0
    exits_per_s: float = 0.0
    progress_per_s: float = 0.0


class X86Vm(VM):
    """A real x86-64 VM on KVM (see the module docstring)."""

    backend = "kvm"

    def __init__(self, definition: VmDefinition, host: HostContext) -> None:
        prog.check_ram(definition.memory_mib * 1024 * 1024, definition.vcpus)
        self.dirty_log_mode: str = x86_keys(definition.extra).dirty_log
        self.platform = KvmPlatform.parse(host.platform)
        self.kvm_vcpus: list[KvmVcpu] = []
        self._system: Kvm | None = None
        self._kvm_vm: kvm.KvmVm | None = None
        self._threads: VcpuThreads | None = None
        self._running = False
        self.exits = [0] * definition.vcpus
        self.crashed: str | None = None
        self._rates = _Rates()
        super().__init__(definition, host)
        try:
            self._build()
        except KvmError as exc:
            self.close()
            raise ConfigError(f"cannot build x86_64 VM {definition.name} on KVM: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _make_ram(self) -> GuestRam:
        return KvmGuestRam(self.definition.memory_mib * 1024 * 1024)

    def _make_workload(self) -> Workload:
        return KvmWorkload(self)

    @property
    def kram(self) -> KvmGuestRam:
        assert isinstance(self.ram, KvmGuestRam)
        return self.ram

    def _build(self) -> None:
        self.kram.now = lambda: self.guest_time
        self._system = Kvm()
        self.host_kvm = HostKvm(self._system, self.platform)
        vm = self._kvm_vm = self._system.create_vm()
        vm.set_tss_addr(prog.TSS_ADDR)
        vm.set_identity_map_addr(prog.IDENTITY_MAP_ADDR)
        if self.dirty_log_mode == "manual-protect":
            vm.enable_manual_protect()
        self.kram.attach(vm, self.dirty_log_mode)
        for gpa, data in prog.image():
            self.ram.write(gpa, data)
        self.guest_cpuid = list(self.host_kvm.cpuid)
        for i in range(len(self.vcpus)):
            vcpu = vm.create_vcpu(i)
            self.kvm_vcpus.append(vcpu)
            vcpu.set_cpuid(self.guest_cpuid)
            vcpu.set_sregs(long_mode_sregs(
                vcpu.get_sregs(), gdt=prog.GDT, gdt_limit=len(prog.gdt_bytes()) - 1,
                cr3=prog.PML4, code_sel=prog.USER_CS, data_sel=prog.USER_SS,
                tss_sel=prog.TSS_SEL, tss=prog.TSS))
            vcpu.set_regs(pack_regs(prog.initial_regs(i, self.definition.seed)))
        self.tsc_hz = self.kvm_vcpus[0].tsc_khz() * 1000
        self.refused_msrs = self._trial_refused()
        self.write_mailbox()

    def _trial_refused(self) -> list[int]:
        """MSRs this host's KVM refuses in KVM_SET_MSRS even with the value it reads: a
        trial, one MSR at a time, on vCPU 0 before it ever ran (setting what was just read
        changes nothing)."""
        v = self.kvm_vcpus[0]
        refused = set(self.platform.refuse_msrs)
        for m in self.host_kvm.msrs:
            got = v.get_msrs([m])
            if not got or v.set_msrs(got) != 1:
                refused.add(m)
        return sorted(refused)

    # --- guest memory the host and the guest share -------------------------------------

    def write_mailbox(self) -> None:
        """Tell every vCPU its rate (after the throttle) and pattern."""
        n = len(self.vcpus)
        for i in range(n):
            p = prog.pacing(self.definition.workload, self.ram.size, n, i, self.tsc_hz,
                            self.workload.throttle_pct)
            self.ram.device_write(prog.MAILBOX + i * prog.SLOT, p.pack())

    def progress(self) -> list[tuple[int, int]]:
        """(counter, checksum) of each vCPU, read from guest memory."""
        page = self.ram.read(prog.STATUS, prog.PAGE)
        return [prog.read_status(page, i) for i in range(len(self.vcpus))]

    def check_progress(self) -> list[bool]:
        """Per vCPU (stopped): does the checksum the guest stored match the host's
        recomputation from the counter it stored?  A vCPU stopped between the two stores
        (at the program's ``publish`` label) has stored the counter of step n but the
        checksum of step n - 1."""
        publish = prog.workload_program().labels["publish"]
        out = []
        for i, (c, s) in enumerate(self.progress()):
            rip = unpack_regs(self.kvm_vcpus[i].get_regs())["rip"]
            n = c - 1 if rip == publish and c > 0 else c
            out.append(prog.expected(self.definition.seed, i, n)[1] == s)
        return out

    def guest_info(self) -> dict[str, Any]:
        prog_ = self.progress()
        info: dict[str, Any] = {
            "progress": sum(c for c, _ in prog_),
            "per_vcpu": [{"progress": c, "checksum": f"{s:#018x}"} for c, s in prog_],
            "exits": sum(self.exits),
            "exits_per_s": round(self._rates.exits_per_s, 1),
            "progress_per_s": round(self._rates.progress_per_s, 1),
            "dirty_log": DIRTY_LOG_MODES[self.dirty_log_mode],
            "dirty_log_reads": self.kram.reads,
            "dirty_rate_mbps": round(self._observed_dirty_mbps(), 3),
            "tsc_khz": self.tsc_hz // 1000,
        }
        if self.crashed:
            info["crashed"] = self.crashed
        return info

    def _observed_dirty_mbps(self) -> float:
        """The rate KVM's dirty log saw over its last reads (MB/s of 4 KiB pages)."""
        reads = self.kram.history
        if len(reads) < 2 or reads[-1][0] <= reads[0][0]:
            return 0.0
        pages = sum(p for _, p in reads[1:])
        return pages * PAGE_4K / (reads[-1][0] - reads[0][0]) / 1e6

    # --- running -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        if self._running:
            return
        if self.crashed:
            raise GuestCrashed(f"{self.name}: the guest crashed ({self.crashed})")
        factory = self.host.vcpu_threads
        if factory is None:
            raise ConfigError(f"{self.name}: this host runs no vCPU threads")
        for h in self.handlers.values():
            h.vm_start()
        self._threads = factory(self)
        self._running = True
        self._threads.start()

    def pause(self) -> None:
        if not self._running or self._threads is None:
            return
        self._threads.stop()
        self._threads = None
        self._running = False
        self.complete_exits()

    def request_stop(self, index: int) -> None:
        """First half of stopping vCPU ``index``: KVM_RUN returns at once from now on."""
        self.kvm_vcpus[index].immediate_exit = True

    def complete_exits(self) -> None:
        for v in self.kvm_vcpus:
            v.complete_exit()

    def vcpu_step(self, index: int) -> float:
        """One ``KVM_RUN`` of vCPU ``index`` and its exit: how long the thread should let
        the vCPU sleep before the next (the guest asked to wait), 0 to re-enter at once.
        Raises GuestCrashed if the guest left its program."""
        vcpu = self.kvm_vcpus[index]
        reason = vcpu.run()
        self.exits[index] += 1
        if reason == kvm.EXIT_MMIO:
            m = vcpu.mmio()
            if m.is_write and m.phys_addr == prog.DOORBELL:
                ticks = int.from_bytes(m.data, "little")
                if ticks == 0:
                    return IDLE_SLEEP_S
                return min(MAX_SLEEP_S, max(MIN_SLEEP_S, ticks / self.tsc_hz))
            self.crashed = f"vCPU {index}: MMIO {'write' if m.is_write else 'read'} " \
                           f"at {m.phys_addr:#x}"
        elif reason in (kvm.EXIT_EINTR, kvm.EXIT_INTR):
            return 0.0
        elif reason == kvm.EXIT_INTERNAL_ERROR:
            sub, data = vcpu.internal_error()
            self.crashed = f"vCPU {index}: KVM internal error {sub} {[hex(d) for d in data]}"
        else:
            rip = unpack_regs(vcpu.get_regs())["rip"]
            self.crashed = (f"vCPU {index}: exit {kvm.EXIT_NAMES.get(reason, reason)} "
                            f"at rip {rip:#x}")
        raise GuestCrashed(self.crashed)

    def run_slice(self, seconds: float) -> int:
        """Guest time passes (the vCPU threads run the guest): update the rates over
        windows of a second of it."""
        if seconds <= 0 or not self._running:
            return 0
        self.guest_time += seconds
        for h in self.handlers.values():
            h.advance(seconds)  # devices run (DMA) as on any VM
        r = self._rates
        span = self.guest_time - r.window_start
        if span >= 1.0:
            exits, progress = sum(self.exits), sum(c for c, _ in self.progress())
            r.exits_per_s = (exits - r.exits) / span
            r.progress_per_s = (progress - r.progress) / span
            r.window_start, r.exits, r.progress = self.guest_time, exits, progress
        return 0

    # --- state -------------------------------------------------------------------------

    def save_vcpus(self) -> list[VcpuState]:
        out = []
        for i, v in enumerate(self.kvm_vcpus):
            regs = unpack_regs(v.get_regs())
            out.append(VcpuState(i, tuple((k, regs[name]) for k, name in enumerate(REG_NAMES))))
        return out

    def restore_vcpus(self, states: list[VcpuState]) -> None:
        if sorted(s.index for s in states) != list(range(len(self.vcpus))):
            raise ConfigError(f"{self.name}: vCPU states for {sorted(s.index for s in states)}"
                              f" do not match {len(self.vcpus)} vCPUs")
        for st in states:
            values = dict(st.regs)
            if sorted(values) != list(range(len(REG_NAMES))):
                raise MalformedRecord(f"vCPU {st.index}: not an x86-64 register set")
            self.kvm_vcpus[st.index].set_regs(
                pack_regs({name: values[k] for k, name in enumerate(REG_NAMES)}))

    def save_state(self, index: int, drop: frozenset[int] = frozenset()) -> X86VcpuState:
        """vCPU ``index``'s whole KVM state (stopped vCPU), without the MSRs in ``drop``."""
        v = self.kvm_vcpus[index]
        wanted = [m for m in self.host_kvm.msrs if m not in drop]
        msrs: list[tuple[int, int]] = []
        while wanted:
            got = v.get_msrs(wanted)
            msrs += got
            if len(got) == len(wanted):
                break
            raise KvmError(errno.EINVAL, f"KVM_GET_MSRS refuses {msr_name(wanted[len(got)])}"
                                         " that it lists")
        return X86VcpuState(index, v.get_regs(), v.get_sregs(), v.get_fpu(), v.get_xsave(),
                            v.get_xcrs(), v.get_events(), v.get_mp_state(), tuple(msrs),
                            kvm.pack_cpuid(self.guest_cpuid))

    def load_state(self, st: X86VcpuState) -> None:
        """Put a vCPU's whole state into KVM (a vCPU that has not run here yet)."""
        if not 0 <= st.index < len(self.kvm_vcpus):
            raise MalformedRecord(f"x86 state for vCPU {st.index}, the VM has "
                                  f"{len(self.kvm_vcpus)}")
        v = self.kvm_vcpus[st.index]
        cpuid = kvm.unpack_cpuid(st.cpuid)
        v.set_cpuid(cpuid)
        self.guest_cpuid = cpuid
        v.set_sregs(st.sregs)
        v.set_regs(st.regs)
        v.set_fpu(st.fpu)
        v.set_xcrs(st.xcrs)
        if len(st.xsave) != kvm.XSAVE_SIZE:
            raise KvmError(errno.E2BIG, f"an XSAVE area of {len(st.xsave)} bytes does not fit "
                                        f"this host's {kvm.XSAVE_SIZE}")
        v.set_xsave(st.xsave)
        msrs = [(m, val) for m, val in st.msrs if m not in self.platform.refuse_msrs]
        refused = [m for m, _ in st.msrs if m in self.platform.refuse_msrs]
        done = v.set_msrs(msrs)
        if refused or done < len(msrs):
            bad = refused[0] if refused else msrs[done][0]
            raise KvmError(errno.EINVAL, f"KVM_SET_MSRS refused {msr_name(bad)} on vCPU "
                                         f"{st.index}")
        v.set_events(st.events)
        v.set_mp_state(st.mp_state)

    def get_clock(self) -> KvmClockState:
        assert self._kvm_vm is not None
        return KvmClockState(self._kvm_vm.get_clock())

    def set_clock(self, clock: KvmClockState) -> None:
        assert self._kvm_vm is not None
        self._kvm_vm.set_clock(clock.data)

    # --- fds -------------------------------------------------------------------------

    def fill_memory(self, kind: str, seed: int) -> None:
        super().fill_memory(kind, seed)
        if kind != "zero":  # the fill covered the program: lay it out again
            self.ram.zero_pages(0, prog.DATA // PAGE_4K)
            for gpa, data in prog.image():
                self.ram.write(gpa, data)
            self.write_mailbox()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pause()
        for v in self.kvm_vcpus:
            v.close()
        self.kvm_vcpus = []
        if self._kvm_vm is not None:
            self._kvm_vm.close()
            self._kvm_vm = None
        if self._system is not None:
            self._system.close()
            self._system = None
        if hasattr(self, "ram"):
            self.ram.close()


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
        }

    def preflight(self, destination: Mapping[str, Any] | None,
                  options: Mapping[str, Any]) -> list[str]:
        """Refuse what the destination's KVM cannot take; list what is knowingly dropped.
        Without the destination's word (a snapshot), the reference is this host's KVM: a
        snapshot is restored on a host of its kind."""
        self.dropped = {}
        self._checked = True
        if options.get("compat") == "qemu":  # as QEMU: the destination finds out at load
            return []
        if destination is None:
            destination = self.capabilities()
        problems: list[str] = []
        warnings: list[str] = []
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
        pieces: list[StatePiece] = [ArchState("kvm_clock", self.vm.get_clock().encode())]
        for i in range(len(self.vm.kvm_vcpus)):
            pieces.append(ArchState("x86_vcpu", self.vm.save_state(i, drop).encode()))
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


def build_x86(definition: VmDefinition, host: HostContext) -> VM:
    vm = X86Vm(definition, host)
    vm.add_handler(X86CpuHandler(vm))
    return vm


ARCHES[ARCH] = ArchSupport(ARCH, PAGE_4K, extra_keys=KEYS, factory=build_x86)
