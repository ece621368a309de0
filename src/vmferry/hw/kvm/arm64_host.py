"""What a KVM/arm64 host is, seen by the firmware-register model: kernel era and CPU.

:class:`KernelCaps` (what the host kernel implements), :class:`HostMitigation` (what the
CPU and kernel provide per Spectre workaround), the workaround register encodings, the
system-event and service-gate tables, and :func:`guest_protection` (what a guest really
gets).  :mod:`vmferry.hw.kvm.arm64_fw` runs a VM on such a host.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING

from vmferry.errors import KernelError
from vmferry.hw.kvm import psci as P
from vmferry.hw.kvm import regs as R
from vmferry.hw.modes import Modes, Switch

if TYPE_CHECKING:
    from vmferry.hw.kvm.arm64_fw import KvmVm


# --- vCPU init features -----------------------------------------------------------------------

KVM_ARM_VCPU_POWER_OFF = 0
KVM_ARM_VCPU_EL1_32BIT = 1
KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_VCPU_PMU_V3 = 3
KVM_CAP_ARM_PSCI_0_2 = 102
KNOWN_FEATURES = frozenset({KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_EL1_32BIT,
                             KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VCPU_PMU_V3})

MPIDR_HWID_BITMASK = 0xFF00FFFFFF
U64_MASK = (1 << 64) - 1


class KvmError(KernelError):
    """A KVM ioctl failed; ``op`` names it, ``rid``/``value`` the register when relevant."""

    def __init__(self, err: int, op: str, rid: int | None = None, value: int | None = None,
                 detail: str = "") -> None:
        self.op = op
        self.detail = detail
        self.rid = rid
        self.value = value
        what = op if rid is None else f"{op} {R.register_name(rid)} ({rid:#018x})"
        if value is not None:
            what += f" = {value:#x}"
        super().__init__(err, f"{what}: {detail}" if detail else what)


class RegListTooSmall(KvmError):
    """``KVM_GET_REG_LIST`` with too small an ``n``: E2BIG, ``n_required`` filled in."""

    def __init__(self, n_required: int) -> None:
        self.n_required = n_required
        super().__init__(errno.E2BIG, "KVM_GET_REG_LIST", detail=f"n must be >= {n_required}")


# --- host description -------------------------------------------------------------------------


class WaLevel(IntEnum):
    """A host's protection for one workaround (the brief's not_avail / avail / not_required)."""

    NOT_AVAIL = 0
    AVAIL = 1
    NOT_REQUIRED = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> WaLevel:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown mitigation level {text!r}") from None


class Workaround(Enum):
    """The three SMCCC architecture workarounds KVM exposes: (ARCH_WORKAROUND fid, register)."""

    WA1 = (P.Smccc.ARCH_WORKAROUND_1, R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1)
    WA2 = (P.Smccc.ARCH_WORKAROUND_2, R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2)
    WA3 = (P.Smccc.ARCH_WORKAROUND_3, R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3)

    @property
    def fid(self) -> int:
        return int(self.value[0])

    @property
    def reg(self) -> int:
        return int(self.value[1])

    @property
    def key(self) -> str:
        return self.name.lower()

    @classmethod
    def by_reg(cls, rid: int) -> Workaround:
        return _WA_BY_REG[rid]

    @classmethod
    def by_fid(cls, fid: int) -> Workaround | None:
        return _WA_BY_FID.get(fid)


_WA_BY_REG: dict[int, Workaround] = {w.reg: w for w in Workaround}
_WA_BY_FID: dict[int, Workaround] = {w.fid: w for w in Workaround}


@dataclass(frozen=True)
class HostMitigation:
    """Per-workaround protection of a host (WA1 Spectre-v2, WA2 Spectre-v4/SSB, WA3 BHB)."""

    wa1: WaLevel = WaLevel.AVAIL
    wa2: WaLevel = WaLevel.AVAIL
    wa3: WaLevel = WaLevel.AVAIL
    ssbs_everywhere: bool = False

    def level(self, wa: Workaround) -> WaLevel:
        return {Workaround.WA1: self.wa1, Workaround.WA2: self.wa2, Workaround.WA3: self.wa3}[wa]

    @classmethod
    def uniform(cls, level: WaLevel) -> HostMitigation:
        return cls(level, level, level)

    def label(self) -> str:
        levels = {self.wa1, self.wa2, self.wa3}
        text = (next(iter(levels)).label if len(levels) == 1 else
                f"wa1={self.wa1.label},wa2={self.wa2.label},wa3={self.wa3.label}")
        return text + (",ssbs" if self.ssbs_everywhere else "")


class Wa2Semantics(Enum):
    NONE = "none"          # no WA_2 register (before 5.3; discoverable from 4.18)
    DYNAMIC = "dynamic"    # 5.3 .. 5.9: raw levels, per-vCPU ENABLED flag
    NARROWED = "narrowed"  # 5.10+: two reported states, incoming values narrowed


@dataclass(frozen=True)
class KernelCaps:
    """What one host kernel era implements (docs/models/psci-firmware-registers.md §1, §3.2, §4)."""

    kernel: str
    era: str
    psci_latest: int
    psci_settable: frozenset[int]
    fw_regs: tuple[int, ...]
    fw_coprocs: frozenset[int]
    unknown_fw_errno: int
    smccc_1_1: bool
    wa_discoverable: frozenset[Workaround]
    wa1_unaffected_ret: int
    wa2_semantics: Wa2Semantics
    bmap_masks: Mapping[int, int] = field(default_factory=dict)
    bmap_defaults: Mapping[int, int] = field(default_factory=dict)
    sysregs: tuple[R.SysReg, ...] = ()
    vendor_hyp_calls: bool = False
    system_suspend_cap: bool = False
    vcpu_features_vm_wide: bool = False

    def __post_init__(self) -> None:
        order = [r for r in R.FW_REG_ORDER if r in self.fw_regs]
        if list(self.fw_regs) != order:
            raise ValueError("fw_regs must follow the kernel's array order")
        if set(self.bmap_masks) != {r for r in self.fw_regs if r in R.BITMAP_REGS}:
            raise ValueError("bmap_masks must name exactly the listed bitmap registers")


#: switch -> (faulty behaviour, hazard) of docs/models/psci-firmware-registers.md §8.3
FW_SWITCHES: dict[str, tuple[str, str]] = {
    "store_wa_on_set": ("SET of a workaround register stores the value", "stale level"),
    "per_vcpu_psci": ("the PSCI version is per vCPU, not per VM", "mixed versions"),
    "no_config_lock": ("bitmap writes do not take config_lock", "lost update"),
    "cpu_on_unlocked": ("CPU_ON checks and powers on without the vCPU's lock",
                        "double power-on"),
    "double_read_version": ("the hypercall handler reads the PSCI version twice",
                            "torn dispatch"),
    "use_after_destroy": ("a vCPU is used after the VM was destroyed", "use-after-free"),
}

#: the firmware model's modes (the scheme of :mod:`vmferry.hw.modes`): ``correct`` and one
#: preset per fault
FW_MODES = Modes("arm64 firmware",
                 (Switch(n, b, h) for n, (b, h) in FW_SWITCHES.items()),
                 {"correct": (), **{n: {n} for n in FW_SWITCHES}}, "correct")


@dataclass(frozen=True)
class FwFaults:
    """Named faulty modes (docs/models/psci-firmware-registers.md §8.3); all off is the correct
    kernel.  Fields are the switches of :data:`FW_MODES`."""

    store_wa_on_set: bool = False
    per_vcpu_psci: bool = False
    no_config_lock: bool = False
    cpu_on_unlocked: bool = False
    double_read_version: bool = False
    use_after_destroy: bool = False

    @classmethod
    def parse(cls, mode: str) -> FwFaults:
        """``preset[+switch...]`` (``correct+no_config_lock``); UnknownMode if unknown."""
        return cls(**{s: True for s in FW_MODES.parse(mode).switches})


def host_reg_level(caps: KernelCaps, host: HostMitigation, wa: Workaround) -> int:
    """What GET of workaround register ``wa`` reports on this host (before any flag)."""
    level = host.level(wa)
    if wa is not Workaround.WA2:
        return int(level)
    if caps.wa2_semantics is Wa2Semantics.DYNAMIC:
        return {WaLevel.NOT_AVAIL: 0, WaLevel.AVAIL: 2, WaLevel.NOT_REQUIRED: 3}[level]
    if level is WaLevel.AVAIL and host.ssbs_everywhere:
        return 0
    return 0 if level is WaLevel.NOT_AVAIL else 3


def arch_features_answer(caps: KernelCaps, host: HostMitigation, wa: Workaround) -> int:
    """KVM's ``SMCCC_ARCH_FEATURES(ARCH_WORKAROUND_n)`` answer on this host
    (docs/models/psci-firmware-registers.md §3.2)."""
    if not caps.smccc_1_1 or wa not in caps.wa_discoverable:
        return P.SmcccRet.NOT_SUPPORTED
    level = host.level(wa)
    if level is WaLevel.NOT_AVAIL:
        return P.SmcccRet.NOT_SUPPORTED
    if wa is Workaround.WA1:
        return P.SmcccRet.SUCCESS if level is WaLevel.AVAIL else caps.wa1_unaffected_ret
    if wa is Workaround.WA3:
        return (P.SmcccRet.SUCCESS if level is WaLevel.AVAIL
                else P.SMCCC_ARCH_WORKAROUND_RET_UNAFFECTED)
    if caps.wa2_semantics is not Wa2Semantics.NARROWED and level is WaLevel.AVAIL:
        # 4.18-5.9 kvm_hvc_call_handler: a dynamically mitigating host (KVM_SSBD_KERNEL)
        # answers SUCCESS, the guest then toggles the mitigation with WA_2 calls.
        return P.SmcccRet.SUCCESS
    if level is WaLevel.AVAIL and host.ssbs_everywhere:
        return P.SmcccRet.NOT_SUPPORTED
    return P.SmcccRet.NOT_REQUIRED


# --- WA_2 encodings ---------------------------------------------------------------------------

WA2_NOT_AVAIL, WA2_UNKNOWN, WA2_AVAIL, WA2_NOT_REQUIRED = 0, 1, 2, 3
WA2_ENABLED = 0x10
WA_LEVEL_MASK = 0xF


def narrow_wa2(value: int) -> int | None:
    """5.10+ narrowing of an incoming WA_2 value; None when the encoding is invalid."""
    if value & ~0x1F:
        return None
    level = value & WA_LEVEL_MASK
    if value & WA2_ENABLED and level != WA2_AVAIL:
        return None
    if level in (WA2_NOT_AVAIL, WA2_UNKNOWN):
        return WA2_NOT_AVAIL
    if level in (WA2_AVAIL, WA2_NOT_REQUIRED):
        return WA2_NOT_REQUIRED
    return None


# --- system events ----------------------------------------------------------------------------


class SystemEventType(IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5


@dataclass(frozen=True)
class SystemEvent:
    """``KVM_EXIT_SYSTEM_EVENT`` with ``ndata = 1``."""

    type: SystemEventType
    flags: int = 0


class MpState(Enum):
    RUNNABLE = "runnable"
    STOPPED = "stopped"


#: Hypercall services gated by a bitmap register bit (docs/models/psci-firmware-registers.md §3.3):
#: fid -> (register, bit).
SERVICE_GATES: dict[int, tuple[int, int]] = {
    **dict.fromkeys(P.TRNG_IDS, (R.KVM_REG_ARM_STD_BMAP, 0)),
    **dict.fromkeys(P.PV_TIME_IDS, (R.KVM_REG_ARM_STD_HYP_BMAP, 0)),
    P.KVM_VENDOR_HYP_FEATURES: (R.KVM_REG_ARM_VENDOR_HYP_BMAP, 0),
    P.KVM_VENDOR_HYP_CALL_UID: (R.KVM_REG_ARM_VENDOR_HYP_BMAP, 0),
    P.KVM_VENDOR_HYP_PTP: (R.KVM_REG_ARM_VENDOR_HYP_BMAP, 1),
    P.KVM_VENDOR_HYP_DISCOVER_IMPL_VER: (R.KVM_REG_ARM_VENDOR_HYP_BMAP_2, 0),
    P.KVM_VENDOR_HYP_DISCOVER_IMPL_CPUS: (R.KVM_REG_ARM_VENDOR_HYP_BMAP_2, 1),
}


# --- what a guest actually gets, per workaround (not visible to the guest itself) -------------


class Protection(Enum):
    """What the host really provides a guest for one workaround, whatever the guest believes.

    UNAFFECTED: the CPU does not need the mitigation.  PERMANENT: the host mitigates without
    guest help (WA_2 NOT_REQUIRED on an affected CPU).  CALLS: the host services the
    ARCH_WORKAROUND call and the guest must issue it.  SSBS: the guest must use the CPU's
    SSBS bit.  NONE: nothing (host unmitigated, or its KVM cannot expose the workaround).
    """

    UNAFFECTED = "unaffected"
    PERMANENT = "permanent"
    CALLS = "calls"
    SSBS = "ssbs"
    NONE = "none"


def guest_protection(caps: KernelCaps, host: HostMitigation, wa: Workaround) -> Protection:
    """The host-side truth used to judge a guest's boot-time decision on this host."""
    level = host.level(wa)
    if level is WaLevel.NOT_REQUIRED:
        return Protection.UNAFFECTED
    if level is WaLevel.NOT_AVAIL or not caps.smccc_1_1 or wa not in caps.wa_discoverable:
        return Protection.NONE
    if wa is not Workaround.WA2 or caps.wa2_semantics is not Wa2Semantics.NARROWED:
        return Protection.CALLS
    return Protection.SSBS if host.ssbs_everywhere else Protection.PERMANENT


def vm_protection(vm: KvmVm) -> dict[Workaround, Protection]:
    return {wa: guest_protection(vm.caps, vm.host, wa) for wa in Workaround}
