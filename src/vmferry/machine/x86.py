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
dirty log (:class:`~vmferry.machine.x86_ram.KvmGuestRam` reads KVM's),
``save_vcpus``/``restore_vcpus`` and the handler
:class:`~vmferry.machine.x86_cpu.X86CpuHandler`, which carries each vCPU's whole KVM state
and the KVM clock in records of their own and checks, before anything moves, that the
destination's KVM can take them.

Definition keys beyond the common ones: ``dirty_log`` = ``"get"`` (``KVM_GET_DIRTY_LOG``,
the default), ``"manual-protect"`` (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: GET, then
CLEAR of the pages read) or ``"ring"`` (``KVM_CAP_DIRTY_LOG_RING_ACQ_REL``: per-vCPU
dirty rings, enabled before the first vCPU exists; a vCPU whose ring fills up exits with
``KVM_EXIT_DIRTY_RING_FULL``, its thread harvests and re-enters).  The mode is fixed when
the VM is built, since KVM takes the ring only before any vCPU exists.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from typing import Any, Protocol

from vmferry.errors import ConfigError, MalformedRecord, ModelError
from vmferry.guest.workload import Workload
from vmferry.guest.x86 import program as prog
from vmferry.hw.x86 import kvm
from vmferry.hw.x86.kvm import Kvm, KvmError, KvmVcpu
from vmferry.hw.x86.longmode import REG_NAMES, long_mode_sregs, pack_regs, unpack_regs
from vmferry.hw.x86.state import KvmClockState, X86VcpuState
from vmferry.machine.ram import PAGE_4K, GuestRam
from vmferry.machine.schema import ARCH_KEYS, x86_keys
from vmferry.machine.vcpu import VcpuState
from vmferry.machine.vm import ARCHES, VM, ArchSupport, HostContext, VmDefinition
from vmferry.machine.x86_cpu import (
    HostKvm,
    KvmPlatform,
    X86CpuHandler,
    msr_name,
    parse_cpuid_bit,
)
from vmferry.machine.x86_ram import DEFAULT_RING_BYTES, DIRTY_LOG_MODES, KvmGuestRam

__all__ = ["ARCH", "KEYS", "GuestCrashed", "KvmGuestRam", "KvmPlatform", "VcpuThreads",
           "X86CpuHandler", "X86Vm", "build_x86", "kvm_status", "parse_cpuid_bit"]

ARCH = "x86_64"
KEYS = ARCH_KEYS[ARCH]
IDLE_SLEEP_S = 0.02
MIN_SLEEP_S = 0.001
MAX_SLEEP_S = 0.02

def kvm_status() -> dict[str, Any]:
    """Whether this host can run x86-64 guests on KVM, and why not."""
    usable, why = kvm.kvm_usable()
    return {"usable": usable, "reason": why}


class VcpuThreads(Protocol):
    """Runs a VM's vCPUs in threads (provided by the host)."""

    def start(self) -> None:
        """Start one thread per vCPU, each calling ``vm.vcpu_step(i)`` until stopped."""

    def stop(self) -> None:
        """Stop every vCPU (``vm.request_stop(i)`` and a signal to its thread) and join."""

    def cpu_seconds(self) -> float:
        """CPU seconds the vCPU threads used so far (their thread CPU clocks)."""


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
        elif self.dirty_log_mode == "ring":  # before the first vCPU, as KVM requires
            offered = vm.check_extension(kvm.CAP_DIRTY_LOG_RING_ACQ_REL)
            if offered < 4096:
                raise ConfigError(f"{self.name}: dirty_log = \"ring\" needs "
                                  "KVM_CAP_DIRTY_LOG_RING_ACQ_REL, which this KVM lacks")
            vm.enable_dirty_ring(min(DEFAULT_RING_BYTES, offered))
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
        self.kram.attach_rings([v.dirty_ring for v in self.kvm_vcpus if v.dirty_ring])
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
            **({"dirty_ring_full_exits": self.kram.ring_full_exits}
               if self.dirty_log_mode == "ring" else {}),
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

    def vcpu_cpu_seconds(self) -> float:
        """CPU seconds the running vCPU threads used so far, as the host's threads report
        it (0.0 while paused)."""
        return self._threads.cpu_seconds() if self._threads is not None else 0.0

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
        elif reason == kvm.EXIT_DIRTY_RING_FULL and self.dirty_log_mode == "ring":
            self.kram.ring_full()  # harvest, then re-enter
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


def build_x86(definition: VmDefinition, host: HostContext) -> VM:
    vm = X86Vm(definition, host)
    vm.add_handler(X86CpuHandler(vm))
    return vm


ARCHES[ARCH] = ArchSupport(ARCH, PAGE_4K, extra_keys=KEYS, factory=build_x86)
