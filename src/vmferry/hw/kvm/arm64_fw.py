"""KVM/arm64 firmware pseudo-registers and the guest-facing PSCI/SMCCC hypercall handler.

Theory of operation
-------------------
A :class:`KvmVm` runs on one host, described by two immutable inputs:

* :class:`KernelCaps`: what the host *kernel* implements (its era): which firmware registers
  ``KVM_GET_REG_LIST`` lists, the default (``KVM_ARM_PSCI_LATEST``) and settable PSCI
  versions, the errno for unknown firmware ids, the WA_2 semantics (none / 5.3-5.9 dynamic
  / 5.10+ narrowed), what ``SMCCC_ARCH_FEATURES`` answers for an unaffected CPU, bitmaps;
* :class:`HostMitigation`: what the host *CPU + kernel* provide per workaround
  (NOT_AVAIL / AVAIL / NOT_REQUIRED) -- a host property, not a VM one.

State (kernel names): ``vm.psci_version`` (0 = never set, VM-wide), ``vm.bmaps`` and
``vm.has_ran_once`` (both guarded by ``vm.config_lock``), per vCPU the init features and
power state.  The workaround registers hold **no** state: GET reports the host level and
SET is a pure "may a guest from that host run here?" check.

One-reg routing (kernel ``arch/arm64/kvm/guest.c``): uninitialised vCPU -> ENOEXEC; a high
word other than ``0x60000000`` -> EINVAL; CORE ids -> the core register file; FW (and, from
5.19, FW_FEAT_BMAP) ids -> the firmware handlers; everything else -> system registers
(unknown -> ENOENT).  Firmware SET order and errnos follow docs/models/psci-firmware-registers.md
§4.4 per era.

The hypercall handler (:meth:`KvmVcpu.hvc`) first serves SMCCC-owned ids (absent before
4.16), then bitmap-gated services (5.19+), then dispatches PSCI on the effective version
read **once** per call.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from vmferry.errors import DoubleFree, UseAfterFree
from vmferry.hw.kvm import psci as P
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_host import (
    KNOWN_FEATURES,
    KVM_ARM_VCPU_EL1_32BIT,
    KVM_ARM_VCPU_PMU_V3,
    KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_PSCI_0_2,
    KVM_CAP_ARM_PSCI_0_2,
    MPIDR_HWID_BITMASK,
    SERVICE_GATES,
    U64_MASK,
    WA2_AVAIL,
    WA2_ENABLED,
    WA2_NOT_AVAIL,
    WA2_NOT_REQUIRED,
    WA2_UNKNOWN,
    WA_LEVEL_MASK,
    FwFaults,
    HostMitigation,
    KernelCaps,
    KvmError,
    MpState,
    Protection,
    RegListTooSmall,
    SystemEvent,
    SystemEventType,
    Wa2Semantics,
    WaLevel,
    Workaround,
    arch_features_answer,
    guest_protection,
    host_reg_level,
    narrow_wa2,
    vm_protection,
)
from vmferry.sync import ModelLock, yield_point

__all__ = [
    "KNOWN_FEATURES",
    "KVM_ARM_VCPU_EL1_32BIT",
    "KVM_ARM_VCPU_PMU_V3",
    "KVM_ARM_VCPU_POWER_OFF",
    "KVM_ARM_VCPU_PSCI_0_2",
    "KVM_CAP_ARM_PSCI_0_2",
    "MPIDR_HWID_BITMASK",
    "SERVICE_GATES",
    "U64_MASK",
    "WA2_AVAIL",
    "WA2_ENABLED",
    "WA2_NOT_AVAIL",
    "WA2_NOT_REQUIRED",
    "WA2_UNKNOWN",
    "WA_LEVEL_MASK",
    "FwFaults",
    "HostMitigation",
    "KernelCaps",
    "KvmError",
    "KvmVcpu",
    "KvmVm",
    "MpState",
    "Protection",
    "RegListTooSmall",
    "SystemEvent",
    "SystemEventType",
    "Wa2Semantics",
    "WaLevel",
    "Workaround",
    "arch_features_answer",
    "guest_protection",
    "host_reg_level",
    "narrow_wa2",
    "vm_protection",
]

# --- the VM -----------------------------------------------------------------------------------


class KvmVm:
    """One KVM VM on a host: VM-wide PSCI version and bitmaps, its vCPUs."""

    def __init__(self, caps: KernelCaps, host: HostMitigation,
                 faults: FwFaults | None = None) -> None:
        self.caps = caps
        self.host = host
        self.faults = faults or FwFaults()
        # Invariant: 0 (never set) or a version a SET accepted on this kernel.
        self.psci_version = 0
        # Invariant: bits within bmap_masks; changes only while not has_ran_once.
        self.bmaps: dict[int, int] = dict(caps.bmap_defaults)
        self.has_ran_once = False
        self.config_lock = ModelLock("kvm.config_lock")
        self.vcpus: list[KvmVcpu] = []
        self.features: frozenset[int] | None = None
        self.system_suspend = False
        self.destroyed = False

    def create_vcpu(self) -> KvmVcpu:
        vcpu = KvmVcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def destroy(self) -> None:
        """Tear the VM down: drop the VM's own reference to every vCPU.

        Correct mode: a vCPU someone still holds stays allocated and its ioctls fail with
        EBADF until the holder puts it.  ``use_after_destroy``: vCPUs are freed at once.
        """
        self.destroyed = True
        for vcpu in self.vcpus:
            if self.faults.use_after_destroy:
                vcpu.freed = True
            else:
                vcpu.put()

    def enable_system_suspend(self) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_ARM_SYSTEM_SUSPEND)``."""
        if not self.caps.system_suspend_cap:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", detail="SYSTEM_SUSPEND unknown")
        self.system_suspend = True

    def vcpu_by_mpidr(self, mpidr: int) -> KvmVcpu | None:
        return next((v for v in self.vcpus if v.mpidr & MPIDR_HWID_BITMASK == mpidr), None)


def _reset_mpidr(index: int) -> int:
    return (1 << 31) | ((index >> 12) & 0xFF) << 16 | ((index >> 4) & 0xFF) << 8 | (index & 0xF)


class KvmVcpu:
    """One vCPU fd: init features, register file, power state and the hypercall handler."""

    def __init__(self, vm: KvmVm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.initialized = False
        self.features: frozenset[int] = frozenset()
        self.mpidr = _reset_mpidr(index)
        self.core: dict[int, int] = dict.fromkeys(R.CORE_REGS.values(), 0)
        self.sysregs: dict[int, int] = {r.rid: r.reset for r in vm.caps.sysregs}
        self.sysregs[R.sys_reg(3, 0, 0, 0, 5)] = self.mpidr
        self.wa2_flag = False  # 5.3-5.9 per-vCPU "WA_2 enabled" flag
        self.stored_wa: dict[int, int] = {}  # only used by the store_wa_on_set fault
        self.local_psci = 0  # only used by the per_vcpu_psci fault
        # Invariant: mp_state changes only under mp_state_lock (CPU_ON, CPU_OFF, system events).
        self.mp_state = MpState.RUNNABLE
        self.mp_state_lock = ModelLock(f"vcpu{index}.mp_state_lock")
        self.pending_exit: SystemEvent | None = None
        self.last_dispatch = 0  # version the PSCI dispatcher chose a handler with
        # Invariant: refcount >= 0; freed iff it reached 0 (or the faulty destroy freed it).
        self.refcount = 1  # the VM's own reference
        self.freed = False

    def get(self) -> KvmVcpu:
        """Take a reference (a migration thread holding the vCPU)."""
        self._check_alive("get")
        self.refcount += 1
        return self

    def put(self) -> None:
        if self.refcount <= 0:
            raise DoubleFree(f"vcpu{self.index}: put with refcount {self.refcount}")
        self.refcount -= 1
        self.freed = self.refcount == 0

    def _check_alive(self, op: str) -> None:
        if self.freed:  # the poisoned-object check
            raise UseAfterFree(f"vcpu{self.index}: {op} on a freed vCPU")
        if self.vm.destroyed:
            raise KvmError(errno.EBADF, op, detail="VM destroyed")

    # -- init and run --------------------------------------------------------------------

    def vcpu_init(self, features: Iterable[int]) -> None:
        """``KVM_ARM_VCPU_INIT``: unknown bits or a second, different VM-wide set -> EINVAL."""
        self._check_alive("KVM_ARM_VCPU_INIT")
        feats = frozenset(features)
        if feats - KNOWN_FEATURES:
            raise KvmError(errno.EINVAL, "KVM_ARM_VCPU_INIT", detail=f"features {sorted(feats)}")
        vm = self.vm
        if vm.caps.vcpu_features_vm_wide and vm.features is not None and vm.features != feats:
            raise KvmError(errno.EINVAL, "KVM_ARM_VCPU_INIT", detail="features differ in VM")
        vm.features = vm.features if vm.features is not None else feats
        self.features = feats
        self.initialized = True
        self.mp_state = (MpState.STOPPED if KVM_ARM_VCPU_POWER_OFF in feats
                         else MpState.RUNNABLE)
        if vm.caps.wa2_semantics is Wa2Semantics.DYNAMIC:
            # kvm_reset_vcpu (5.3-5.9): the flag starts on only when the host mitigates
            # dynamically (KVM_SSBD_KERNEL, register level AVAIL); other hosts leave it off.
            self.wa2_flag = vm.host.wa2 is WaLevel.AVAIL

    def run(self) -> None:
        """``KVM_RUN`` (first entry): marks the VM as having run, under ``config_lock``."""
        self._require_init("KVM_RUN")
        vm = self.vm
        if vm.faults.no_config_lock:
            yield_point("kvm.first_run", vm, write=True)
            vm.has_ran_once = True
            return
        with vm.config_lock:
            yield_point("kvm.first_run", vm, write=True)
            vm.has_ran_once = True

    @property
    def is_32bit(self) -> bool:
        return KVM_ARM_VCPU_EL1_32BIT in self.features

    def effective_psci_version(self) -> int:
        """``kvm_psci_version()``: 0.1 without PSCI_0_2, else the VM's value or the latest."""
        if KVM_ARM_VCPU_PSCI_0_2 not in self.features:
            return P.KVM_ARM_PSCI_0_1
        stored = self.local_psci if self.vm.faults.per_vcpu_psci else self.vm.psci_version
        return stored or self.vm.caps.psci_latest

    # -- KVM_GET_REG_LIST / GET_ONE_REG / SET_ONE_REG --------------------------------------

    def reg_list(self) -> list[int]:
        """The ids this vCPU lists, in kernel order: core, firmware, timers, system regs."""
        timers = (R.KVM_REG_ARM_TIMER_CTL, R.KVM_REG_ARM_TIMER_CNT, R.KVM_REG_ARM_TIMER_CVAL)
        listed_timers = [t for t in timers if t in self.sysregs]
        others = [r.rid for r in self.vm.caps.sysregs if r.rid not in timers]
        return [*R.CORE_REGS.values(), *self.vm.caps.fw_regs, *listed_timers, *others]

    def get_reg_list(self, n: int) -> list[int]:
        """Raises ENOEXEC before init, :class:`RegListTooSmall` (E2BIG) when ``n`` is short."""
        self._require_init("KVM_GET_REG_LIST")
        ids = self.reg_list()
        if n < len(ids):
            raise RegListTooSmall(len(ids))
        return ids

    def get_one_reg(self, rid: int) -> int:
        self._require_init("KVM_GET_ONE_REG")
        value = self.sysregs.get(rid)  # a listed system register: routing can only say "sys"
        if value is not None:
            return value
        target = self._route("KVM_GET_ONE_REG", rid)
        if target == "core":
            return self.core[rid]
        if target == "fw":
            return self._get_fw(rid)
        return self._sysreg("KVM_GET_ONE_REG", rid)

    def set_one_reg(self, rid: int, value: int) -> None:
        self._require_init("KVM_SET_ONE_REG")
        target = "sys" if rid in self.sysregs else self._route("KVM_SET_ONE_REG", rid)
        if not 0 <= value < 1 << (8 * R.reg_size(rid)):
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value, "wider than register")
        if target == "core":
            self.core[rid] = value
        elif target == "fw":
            self._set_fw(rid, value)
        else:
            self._sysreg("KVM_SET_ONE_REG", rid)
            self.sysregs[rid] = value

    def _require_init(self, op: str) -> None:
        self._check_alive(op)
        if not self.initialized:
            raise KvmError(errno.ENOEXEC, op, detail="vCPU not initialised")

    def _route(self, op: str, rid: int) -> str:
        if not R.is_routable(rid):
            raise KvmError(errno.EINVAL, op, rid, detail="not an arm64 register id")
        cp = R.coproc_of(rid)
        if cp == R.Coproc.CORE:
            if rid not in self.core:
                raise KvmError(errno.EINVAL, op, rid, detail="bad core register offset/size")
            return "core"
        if cp in self.vm.caps.fw_coprocs:
            if R.reg_size(rid) != 8:
                raise KvmError(errno.ENOENT, op, rid, detail="firmware registers are 64-bit")
            if rid not in self.vm.caps.fw_regs:
                raise KvmError(self.vm.caps.unknown_fw_errno, op, rid, detail="unknown fw reg")
            return "fw"
        return "sys"

    def _sysreg(self, op: str, rid: int) -> int:
        if rid not in self.sysregs:
            raise KvmError(errno.ENOENT, op, rid, detail="no such system register")
        return self.sysregs[rid]

    # -- firmware GET -------------------------------------------------------------------------

    def _get_fw(self, rid: int) -> int:
        if rid == R.KVM_REG_ARM_PSCI_VERSION:
            return self.effective_psci_version()
        if rid in R.WORKAROUND_REGS:
            if self.vm.faults.store_wa_on_set and rid in self.stored_wa:
                return self.stored_wa[rid]
            wa = Workaround.by_reg(rid)
            level = host_reg_level(self.vm.caps, self.vm.host, wa)
            if wa is Workaround.WA2 and level == WA2_AVAIL and self.wa2_flag:
                level |= WA2_ENABLED
            return level
        return self.vm.bmaps[rid]

    # -- firmware SET (docs/models/psci-firmware-registers.md §4.4, in the kernel's order) ---

    def _set_fw(self, rid: int, value: int) -> None:
        if rid == R.KVM_REG_ARM_PSCI_VERSION:
            self._set_psci(value)
        elif rid in (R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1, R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3):
            self._check_wa_level(rid, value)
        elif rid == R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2:
            self._set_wa2(value)
        else:
            self._set_bitmap(rid, value)

    def _set_psci(self, value: int) -> None:
        wants02 = KVM_ARM_VCPU_PSCI_0_2 in self.features
        rid = R.KVM_REG_ARM_PSCI_VERSION
        if value == P.KVM_ARM_PSCI_0_1:
            if wants02:
                raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value, "0.1 on a 0.2 vCPU")
        elif value in self.vm.caps.psci_settable:
            if not wants02:
                raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value, "vCPU speaks 0.1")
        else:
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value,
                           f"PSCI {P.PsciVersion.name(value)} not implemented by this kernel")
        yield_point("kvm.psci_version", self.vm, write=True)
        if self.vm.faults.per_vcpu_psci:
            self.local_psci = value
        else:
            self.vm.psci_version = value

    def _check_wa_level(self, rid: int, value: int) -> None:
        wa = Workaround.by_reg(rid)
        host_level = host_reg_level(self.vm.caps, self.vm.host, wa)
        if value & ~WA_LEVEL_MASK:
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value, "bits above level")
        if value > host_level:
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value,
                           f"incoming level {value} exceeds this host's level {host_level}")
        self._fault_store(rid, value)

    def _set_wa2(self, value: int) -> None:
        rid = R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2
        host_level = host_reg_level(self.vm.caps, self.vm.host, Workaround.WA2)
        if self.vm.caps.wa2_semantics is Wa2Semantics.DYNAMIC:
            self._set_wa2_dynamic(value, host_level)
            return
        narrowed = narrow_wa2(value)
        if narrowed is None:
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value, "invalid WA_2 encoding")
        if narrowed > host_level:
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value,
                           f"narrowed level {narrowed} exceeds this host's level {host_level}")
        self._fault_store(rid, value)

    def _set_wa2_dynamic(self, value: int, host_level: int) -> None:
        rid = R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2
        level = value & WA_LEVEL_MASK
        if value & ~0x1F or level > WA2_NOT_REQUIRED:
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value, "invalid WA_2 encoding")
        if level > host_level:
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value,
                           f"incoming level {level} exceeds this host's level {host_level}")
        if value & WA2_ENABLED and level != WA2_AVAIL:
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value, "ENABLED without AVAIL")
        if host_level == WA2_AVAIL:
            # kvm_arm_set_fw_reg's final switch (virt/kvm/arm/psci.c, 5.3-5.9) only runs for
            # a dynamically mitigating host and has two cases: AVAIL copies the ENABLED bit,
            # NOT_REQUIRED forces the flag on.  Levels 0 and 1 leave the flag as it was.
            if level == WA2_AVAIL:
                self.wa2_flag = bool(value & WA2_ENABLED)
            elif level == WA2_NOT_REQUIRED:
                self.wa2_flag = True
        self._fault_store(rid, value)

    def _fault_store(self, rid: int, value: int) -> None:
        if self.vm.faults.store_wa_on_set:
            self.stored_wa[rid] = value

    def _set_bitmap(self, rid: int, value: int) -> None:
        vm = self.vm
        if value & ~vm.caps.bmap_masks[rid]:
            raise KvmError(errno.EINVAL, "KVM_SET_ONE_REG", rid, value, "unsupported feature bit")
        if vm.faults.no_config_lock:
            self._bitmap_update(rid, value)
            return
        with vm.config_lock:
            self._bitmap_update(rid, value)

    def _bitmap_update(self, rid: int, value: int) -> None:
        vm = self.vm
        yield_point("kvm.bitmap.check", vm, write=False)
        if vm.has_ran_once and value != vm.bmaps[rid]:
            raise KvmError(errno.EBUSY, "KVM_SET_ONE_REG", rid, value, "VM has already run")
        yield_point("kvm.bitmap.write", vm, write=True)
        vm.bmaps[rid] = value

    # -- hypercalls ------------------------------------------------------------------------------

    def hvc(self, x0: int, x1: int = 0, x2: int = 0, x3: int = 0) -> tuple[int, int, int, int]:
        """One guest HVC; returns x0..x3 as the guest sees them (x0 signed for error codes)."""
        self._check_alive("hvc")
        fid = x0 & 0xFFFFFFFF
        if self.is_32bit and P.smccc_is_64(fid):
            return (P.SmcccRet.NOT_SUPPORTED, x1, x2, x3)
        if self.vm.caps.smccc_1_1:
            handled = self._smccc(fid, x1)
            if handled is not None:
                return handled
        return self._psci(fid, x1, x2, x3)

    def _bmap_bit(self, rid: int, bit: int) -> bool:
        return bool(self.vm.bmaps.get(rid, 0) >> bit & 1)

    def _service_allowed(self, fid: int) -> bool | None:
        """Bitmap gating (5.19+): True/False for gated ids, None for ids not gated here."""
        gate = SERVICE_GATES.get(fid)
        if gate is None:
            return None
        rid, bit = gate
        if rid not in self.vm.caps.fw_regs:
            return rid in R.BITMAP_REGS[:3] and self.vm.caps.vendor_hyp_calls
        return self._bmap_bit(rid, bit)

    def _smccc(self, fid: int, x1: int) -> tuple[int, int, int, int] | None:
        ns = (P.SmcccRet.NOT_SUPPORTED, 0, 0, 0)
        if fid == P.Smccc.VERSION:
            return (P.ARM_SMCCC_VERSION_1_1, 0, 0, 0)
        if fid == P.Smccc.ARCH_FEATURES:
            return (self._arch_features(x1 & 0xFFFFFFFF), 0, 0, 0)
        wa = Workaround.by_fid(fid)
        if wa is not None:
            known = wa in self.vm.caps.wa_discoverable
            return (P.SmcccRet.SUCCESS, 0, 0, 0) if known else ns
        allowed = self._service_allowed(fid)
        if allowed is None:
            return ns if P.smccc_owner(fid) == P.SmcccOwner.VENDOR_HYP else None
        if not allowed:
            return ns
        return self._service(fid)

    def _arch_features(self, target: int) -> int:
        wa = Workaround.by_fid(target)
        if wa is not None:
            return arch_features_answer(self.vm.caps, self.vm.host, wa)
        if target == P.PV_TIME_FEATURES:
            allowed = self._service_allowed(target)
            return P.SmcccRet.SUCCESS if allowed else P.SmcccRet.NOT_SUPPORTED
        return P.SmcccRet.NOT_SUPPORTED

    def _service(self, fid: int) -> tuple[int, int, int, int]:
        """Bitmap-gated services that are enabled: discovery answers only."""
        if fid == P.KVM_VENDOR_HYP_FEATURES:
            bits = 1 | (2 if self._service_allowed(P.KVM_VENDOR_HYP_PTP) else 0)
            return (bits, 0, 0, 0)
        if fid == P.TRNG_IDS[0]:
            return (0x10000, 0, 0, 0)
        return (P.SmcccRet.SUCCESS, 0, 0, 0)

    # -- PSCI ------------------------------------------------------------------------------------

    def _psci(self, fid: int, x1: int, x2: int, x3: int) -> tuple[int, int, int, int]:
        version = self.effective_psci_version()  # read once per call
        if version == P.KVM_ARM_PSCI_0_1:
            return self._psci_0_1(fid, x1, x2, x3)
        fn = P.psci_function(fid)
        if fn is None or not P.kvm_implements(fid, version, system_suspend=self.vm.system_suspend):
            return (P.PsciRet.NOT_SUPPORTED, x1, x2, x3)
        if fn.name == "SYSTEM_SUSPEND":  # exit to userspace, no register touched
            self.pending_exit = SystemEvent(SystemEventType.SUSPEND)
            return (fid, x1, x2, x3)
        if not P.smccc_is_64(fid):
            x1, x2, x3 = x1 & 0xFFFFFFFF, x2 & 0xFFFFFFFF, x3 & 0xFFFFFFFF
        self.last_dispatch = version
        yield_point("kvm.psci.dispatch", self.vm, write=False)
        if self.vm.faults.double_read_version:  # faulty: the handler reads it again
            version = self.effective_psci_version()
        return (self._psci_call(fn.name, version, x1, x2, x3), x1, x2, x3)

    def _psci_call(self, name: str, version: int, x1: int, x2: int, x3: int) -> int:
        simple = {"PSCI_VERSION": version, "CPU_SUSPEND": P.PsciRet.SUCCESS,
                  "MIGRATE_INFO_TYPE": P.PSCI_0_2_TOS_MP}
        if name in simple:
            return int(simple[name])
        if name == "PSCI_FEATURES":
            return self._psci_features(version, x1)
        if name == "CPU_OFF":
            self.mp_state = MpState.STOPPED
            return P.PsciRet.SUCCESS
        if name == "CPU_ON":
            return self._cpu_on(x1, x2, x3, version)
        if name == "AFFINITY_INFO":
            return self._affinity_info(x1, x2)
        return self._system_event(name, x1, x2)

    def _psci_0_1(self, fid: int, x1: int, x2: int, x3: int) -> tuple[int, int, int, int]:
        if fid == P.Psci01.CPU_OFF:
            self.mp_state = MpState.STOPPED
            return (P.PsciRet.SUCCESS, x1, x2, x3)
        if fid == P.Psci01.CPU_ON:
            return (self._cpu_on(x1, x2, x3, P.KVM_ARM_PSCI_0_1), x1, x2, x3)
        return (P.PsciRet.NOT_SUPPORTED, x1, x2, x3)

    def _psci_features(self, version: int, target: int) -> int:
        target &= 0xFFFFFFFF
        if self.is_32bit and P.smccc_is_64(target):
            return P.PsciRet.NOT_SUPPORTED
        if target == P.Smccc.VERSION:
            return P.PsciRet.SUCCESS
        if target in (P.PSCI_ID["SYSTEM_OFF2"], P.PSCI_ID64["SYSTEM_OFF2"]):
            ok = P.PsciVersion.minor(version) >= 3
            return P.PSCI_1_3_OFF_TYPE_HIBERNATE_OFF if ok else P.PsciRet.NOT_SUPPORTED
        ok = P.kvm_implements(target, version, system_suspend=self.vm.system_suspend)
        return P.PsciRet.SUCCESS if ok else P.PsciRet.NOT_SUPPORTED

    def _cpu_on(self, target: int, pc: int, context: int, version: int) -> int:
        if target & ~MPIDR_HWID_BITMASK:
            return P.PsciRet.INVALID_PARAMS
        vcpu = self.vm.vcpu_by_mpidr(target)
        if vcpu is None:
            return P.PsciRet.INVALID_PARAMS
        if self.vm.faults.cpu_on_unlocked:
            return self._cpu_on_target(vcpu, pc, context, version)
        with vcpu.mp_state_lock:
            return self._cpu_on_target(vcpu, pc, context, version)

    def _cpu_on_target(self, vcpu: KvmVcpu, pc: int, context: int, version: int) -> int:
        yield_point("kvm.cpu_on.check", vcpu, write=False)
        if vcpu.mp_state is not MpState.STOPPED:
            return (P.PsciRet.ALREADY_ON if version >= P.KVM_ARM_PSCI_0_2
                    else P.PsciRet.INVALID_PARAMS)
        vcpu.core[R.CORE_REGS["pc"]] = pc
        vcpu.core[R.CORE_REGS["x0"]] = context
        yield_point("kvm.cpu_on.publish", vcpu, write=True)
        vcpu.mp_state = MpState.RUNNABLE
        return P.PsciRet.SUCCESS

    def _affinity_info(self, target: int, level: int) -> int:
        if level > 3:
            return P.PsciRet.INVALID_PARAMS
        if target & ~MPIDR_HWID_BITMASK:
            return P.PsciRet.INVALID_PARAMS
        shift = ((1 << level) >> 1) << 3
        mask = MPIDR_HWID_BITMASK & (U64_MASK << shift)
        matches = [v for v in self.vm.vcpus if v.mpidr & mask == target & mask]
        if not matches:
            return P.PsciRet.INVALID_PARAMS
        on = any(v.mp_state is not MpState.STOPPED for v in matches)
        return 0 if on else 1

    def _system_event(self, name: str, x1: int, x2: int) -> int:
        if name == "SYSTEM_RESET2" and 0 < x1 < 0x80000000:
            return P.PsciRet.INVALID_PARAMS
        if name == "SYSTEM_OFF2" and (x1 not in (0, P.PSCI_1_3_OFF_TYPE_HIBERNATE_OFF) or x2):
            return P.PsciRet.INVALID_PARAMS
        kind, flags = {
            "SYSTEM_OFF": (SystemEventType.SHUTDOWN, 0),
            "SYSTEM_OFF2": (SystemEventType.SHUTDOWN, 1),
            "SYSTEM_RESET": (SystemEventType.RESET, 0),
            "SYSTEM_RESET2": (SystemEventType.RESET, 1),
        }[name]
        for vcpu in self.vm.vcpus:
            vcpu.mp_state = MpState.STOPPED
        self.pending_exit = SystemEvent(kind, flags)
        return P.PsciRet.INTERNAL_FAILURE
