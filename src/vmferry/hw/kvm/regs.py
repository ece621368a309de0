"""arm64 KVM register ids, built the way the kernel's uapi headers build them.

Theory of operation
-------------------
Every register reachable through ``KVM_GET_ONE_REG`` / ``KVM_SET_ONE_REG`` is named by a
64-bit id::

     63      56 55  52 51        32 31       16 15            0
    +----------+------+------------+-----------+---------------+
    | arch 0x60| size | 0          | coproc    | register bits |
    +----------+------+------------+-----------+---------------+

* arch ``KVM_REG_ARM64`` (``0x6000000000000000``);
* size ``log2(bytes)`` in bits [55:52] (U32 = 2, U64 = 3, U128 = 4);
* coproc in bits [27:16]: CORE (``0x10``), DEMUX, SYSREG (``0x13``), FW (``0x14``),
  SVE, FW_FEAT_BMAP (``0x16``);
* CORE registers are numbered by their offset in ``struct kvm_regs`` in 32-bit words;
  SYSREG ids pack (op0, op1, CRn, CRm, op2); FW and bitmap ids are a plain 16-bit index.

The kernel routes an id only when bits [63:32] with the size field cleared equal
``0x60000000`` (anything else is -EINVAL).  This module holds only numbers and pure
builders; the one-reg semantics live in :mod:`vmferry.hw.kvm.arm64_fw`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

KVM_REG_ARCH_MASK: Final = 0xFF00000000000000
KVM_REG_ARM64: Final = 0x6000000000000000
KVM_REG_SIZE_SHIFT: Final = 52
KVM_REG_SIZE_MASK: Final = 0x00F0000000000000
KVM_REG_SIZE_U32: Final = 0x0020000000000000
KVM_REG_SIZE_U64: Final = 0x0030000000000000
KVM_REG_SIZE_U128: Final = 0x0040000000000000

KVM_REG_ARM_COPROC_MASK: Final = 0x000000000FFF0000
KVM_REG_ARM_COPROC_SHIFT: Final = 16
#: The value bits [63:32] must have once the size field is masked out.
ROUTABLE_HIGH_WORD: Final = 0x60000000


class Coproc(IntEnum):
    """``KVM_REG_ARM_*`` coprocessor numbers (bits [27:16] of an arm64 id)."""

    CORE = 0x10
    DEMUX = 0x11
    SYSREG = 0x13
    FW = 0x14
    SVE = 0x15
    FW_FEAT_BMAP = 0x16


def reg_id(coproc: int, index: int, size: int = KVM_REG_SIZE_U64) -> int:
    """Build an arm64 id from a coproc number, its 16-bit index and a size field."""
    cp = (coproc << KVM_REG_ARM_COPROC_SHIFT) & KVM_REG_ARM_COPROC_MASK
    return KVM_REG_ARM64 | size | cp | (index & 0xFFFF)


def reg_size(rid: int) -> int:
    """``KVM_REG_SIZE(id)``: the register width in bytes."""
    return 1 << ((rid & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


def coproc_of(rid: int) -> int:
    return (rid & KVM_REG_ARM_COPROC_MASK) >> KVM_REG_ARM_COPROC_SHIFT


def is_routable(rid: int) -> bool:
    """The kernel's first routing test: high word, size masked out, is ``0x60000000``."""
    return ((rid & ~KVM_REG_SIZE_MASK) >> 32) == ROUTABLE_HIGH_WORD


# --- firmware pseudo-registers (coproc 0x14) and feature bitmaps (coproc 0x16) ----------


def fw_reg(r: int) -> int:
    """``KVM_REG_ARM_FW_REG(r)``."""
    return reg_id(Coproc.FW, r)


def fw_feat_bmap_reg(r: int) -> int:
    """``KVM_REG_ARM_FW_FEAT_BMAP_REG(r)``."""
    return reg_id(Coproc.FW_FEAT_BMAP, r)


KVM_REG_ARM_PSCI_VERSION: Final = fw_reg(0)
KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1: Final = fw_reg(1)
KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2: Final = fw_reg(2)
KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3: Final = fw_reg(3)
KVM_REG_ARM_STD_BMAP: Final = fw_feat_bmap_reg(0)
KVM_REG_ARM_STD_HYP_BMAP: Final = fw_feat_bmap_reg(1)
KVM_REG_ARM_VENDOR_HYP_BMAP: Final = fw_feat_bmap_reg(2)
KVM_REG_ARM_VENDOR_HYP_BMAP_2: Final = fw_feat_bmap_reg(3)

#: Firmware registers in the kernel's array order (``kvm_arm_fw_reg_ids``).
FW_REG_ORDER: Final = (
    KVM_REG_ARM_PSCI_VERSION,
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1,
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2,
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3,
    KVM_REG_ARM_STD_BMAP,
    KVM_REG_ARM_STD_HYP_BMAP,
    KVM_REG_ARM_VENDOR_HYP_BMAP,
    KVM_REG_ARM_VENDOR_HYP_BMAP_2,
)
WORKAROUND_REGS: Final = (
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1,
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2,
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3,
)
BITMAP_REGS: Final = FW_REG_ORDER[4:]

FW_REG_NAMES: Final[dict[int, str]] = {
    KVM_REG_ARM_PSCI_VERSION: "PSCI_VERSION",
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1: "SMCCC_ARCH_WORKAROUND_1",
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2: "SMCCC_ARCH_WORKAROUND_2",
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3: "SMCCC_ARCH_WORKAROUND_3",
    KVM_REG_ARM_STD_BMAP: "STD_BMAP",
    KVM_REG_ARM_STD_HYP_BMAP: "STD_HYP_BMAP",
    KVM_REG_ARM_VENDOR_HYP_BMAP: "VENDOR_HYP_BMAP",
    KVM_REG_ARM_VENDOR_HYP_BMAP_2: "VENDOR_HYP_BMAP_2",
}


def is_firmware(rid: int) -> bool:
    """True for every id the kernel routes to its firmware handlers (coproc 0x14/0x16)."""
    return is_routable(rid) and coproc_of(rid) in (Coproc.FW, Coproc.FW_FEAT_BMAP)


# --- core registers (coproc 0x10): offsets into struct kvm_regs, in 32-bit words ---------

_USER_PT_REGS = 0  # regs[31], sp, pc, pstate: 34 u64
_SP_EL1 = 34 * 8
_ELR_EL1 = _SP_EL1 + 8
_SPSR = _ELR_EL1 + 8  # spsr[5]
_FP_REGS = 336  # user_fpsimd_state is 16-byte aligned: 328 rounds up to 336
_FPSR = _FP_REGS + 32 * 16
_FPCR = _FPSR + 4


def core_reg(byte_offset: int, size: int) -> int:
    """``KVM_REG_ARM_CORE_REG``: an offset in ``struct kvm_regs``, counted in u32 words."""
    return reg_id(Coproc.CORE, byte_offset // 4, size)


def _core_table() -> dict[str, int]:
    table: dict[str, int] = {}
    for n in range(31):
        table[f"x{n}"] = core_reg(_USER_PT_REGS + 8 * n, KVM_REG_SIZE_U64)
    table["sp"] = core_reg(31 * 8, KVM_REG_SIZE_U64)
    table["pc"] = core_reg(32 * 8, KVM_REG_SIZE_U64)
    table["pstate"] = core_reg(33 * 8, KVM_REG_SIZE_U64)
    table["sp_el1"] = core_reg(_SP_EL1, KVM_REG_SIZE_U64)
    table["elr_el1"] = core_reg(_ELR_EL1, KVM_REG_SIZE_U64)
    for n in range(5):
        table[f"spsr{n}"] = core_reg(_SPSR + 8 * n, KVM_REG_SIZE_U64)
    for n in range(32):
        table[f"v{n}"] = core_reg(_FP_REGS + 16 * n, KVM_REG_SIZE_U128)
    table["fpsr"] = core_reg(_FPSR, KVM_REG_SIZE_U32)
    table["fpcr"] = core_reg(_FPCR, KVM_REG_SIZE_U32)
    return table


#: Core registers in ``struct kvm_regs`` order, as ``KVM_GET_REG_LIST`` lists them.
CORE_REGS: Final[dict[str, int]] = _core_table()


# --- system registers (coproc 0x13) ------------------------------------------------------


def sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """``ARM64_SYS_REG(op0, op1, crn, crm, op2)``."""
    bits = (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
    return reg_id(Coproc.SYSREG, bits)


@dataclass(frozen=True)
class SysReg:
    """A system register a kernel era exposes, with its reset value."""

    name: str
    rid: int
    reset: int = 0


KVM_REG_ARM_TIMER_CTL: Final = sys_reg(3, 3, 14, 3, 1)
KVM_REG_ARM_TIMER_CNT: Final = sys_reg(3, 3, 14, 3, 2)
KVM_REG_ARM_TIMER_CVAL: Final = sys_reg(3, 3, 14, 0, 2)

_NAMED_SYSREGS: Final = (
    SysReg("MPIDR_EL1", sys_reg(3, 0, 0, 0, 5), 0x80000000),
    SysReg("SCTLR_EL1", sys_reg(3, 0, 1, 0, 0), 0x00C50838),
    SysReg("CPACR_EL1", sys_reg(3, 0, 1, 0, 2)),
    SysReg("TTBR0_EL1", sys_reg(3, 0, 2, 0, 0)),
    SysReg("TTBR1_EL1", sys_reg(3, 0, 2, 0, 1)),
    SysReg("TCR_EL1", sys_reg(3, 0, 2, 0, 2)),
    SysReg("AFSR0_EL1", sys_reg(3, 0, 5, 1, 0)),
    SysReg("AFSR1_EL1", sys_reg(3, 0, 5, 1, 1)),
    SysReg("ESR_EL1", sys_reg(3, 0, 5, 2, 0)),
    SysReg("FAR_EL1", sys_reg(3, 0, 6, 0, 0)),
    SysReg("PAR_EL1", sys_reg(3, 0, 7, 4, 0)),
    SysReg("MAIR_EL1", sys_reg(3, 0, 10, 2, 0)),
    SysReg("AMAIR_EL1", sys_reg(3, 0, 10, 3, 0)),
    SysReg("VBAR_EL1", sys_reg(3, 0, 12, 0, 0)),
    SysReg("CONTEXTIDR_EL1", sys_reg(3, 0, 13, 0, 1)),
    SysReg("TPIDR_EL1", sys_reg(3, 0, 13, 0, 4)),
    SysReg("CNTKCTL_EL1", sys_reg(3, 0, 14, 1, 0)),
    SysReg("CSSELR_EL1", sys_reg(3, 2, 0, 0, 0)),
    SysReg("TPIDR_EL0", sys_reg(3, 3, 13, 0, 2)),
    SysReg("TPIDRRO_EL0", sys_reg(3, 3, 13, 0, 3)),
    SysReg("CNTV_CTL_EL0", KVM_REG_ARM_TIMER_CTL),
    SysReg("CNTVCT_EL0", KVM_REG_ARM_TIMER_CNT),
    SysReg("CNTV_CVAL_EL0", KVM_REG_ARM_TIMER_CVAL),
)


def _id_space() -> tuple[SysReg, ...]:
    """The feature-id register space (op0=3, op1=0, CRn=0, CRm=1..7): writable on new kernels."""
    return tuple(
        SysReg(f"ID_3_0_0_{crm}_{op2}", sys_reg(3, 0, 0, crm, op2))
        for crm in range(1, 8)
        for op2 in range(8)
    )


def _debug_space() -> tuple[SysReg, ...]:
    return tuple(
        SysReg(f"DBG{kind}{n}_EL1", sys_reg(2, 0, 0, n, op2))
        for n in range(16)
        for kind, op2 in (("BVR", 4), ("BCR", 5), ("WVR", 6), ("WCR", 7))
    )


#: Every system register the model can expose, in the order kernel eras grew them; a host
#: profile exposes a prefix of this catalogue (``sysreg_count``).
SYSREG_CATALOGUE: Final[tuple[SysReg, ...]] = _NAMED_SYSREGS + _id_space() + _debug_space()


_NAMES: Final[dict[int, str]] = {
    **{rid: f"core:{name}" for name, rid in CORE_REGS.items()},
    **{reg.rid: reg.name for reg in SYSREG_CATALOGUE},
    **FW_REG_NAMES,
}


def register_name(rid: int) -> str:
    """A readable name for any id (used in reasons and error messages)."""
    if rid in _NAMES:
        return _NAMES[rid]
    if is_routable(rid) and coproc_of(rid) == Coproc.FW:
        return f"fw reg {rid & 0xFFFF}"
    if is_routable(rid) and coproc_of(rid) == Coproc.FW_FEAT_BMAP:
        return f"fw feat reg {rid & 0xFFFF}"
    return f"reg {rid:#018x}"
