"""PSCI and SMCCC numbers, and which PSCI functions KVM implements per selected version.

Theory of operation
-------------------
A PSCI (and SMCCC) version is one 32-bit word: major in bits [31:16], minor in [15:0].
KVM picks a handler once per call from the vCPU's effective version: the private 0.1 ABI
(``0x95c1ba5e``.. ids), the 0.2 handler, or the 1.x handler given the minor number.
:data:`PSCI_FUNCTIONS` is the literal table of standard PSCI function ids with the PSCI
revision that introduced each and whether KVM services it; :func:`kvm_implements` reads it.
The dispatcher itself lives in :mod:`vmferry.hw.kvm.arm64_fw`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

# --- version words ------------------------------------------------------------------------

PSCI_VERSION_MINOR_MASK: Final = 0xFFFF
PSCI_VERSION_MAJOR_SHIFT: Final = 16


class PsciVersion:
    """``PSCI_VERSION(maj, min)`` and its decoders (the same layout serves SMCCC)."""

    @staticmethod
    def make(major: int, minor: int) -> int:
        return ((major << PSCI_VERSION_MAJOR_SHIFT) & ~PSCI_VERSION_MINOR_MASK & 0xFFFFFFFF) | (
            minor & PSCI_VERSION_MINOR_MASK
        )

    @staticmethod
    def major(v: int) -> int:
        return (v & ~PSCI_VERSION_MINOR_MASK & 0xFFFFFFFF) >> PSCI_VERSION_MAJOR_SHIFT

    @staticmethod
    def minor(v: int) -> int:
        return v & PSCI_VERSION_MINOR_MASK

    @staticmethod
    def name(v: int) -> str:
        return f"{PsciVersion.major(v)}.{PsciVersion.minor(v)}"

    @staticmethod
    def parse(text: str) -> int:
        """``"1.0"`` -> ``0x10000``; raises ValueError on anything else."""
        major, sep, minor = text.partition(".")
        if not sep or not major.isdigit() or not minor.isdigit():
            raise ValueError(f"not a PSCI version: {text!r}")
        return PsciVersion.make(int(major), int(minor))


KVM_ARM_PSCI_0_1: Final = PsciVersion.make(0, 1)
KVM_ARM_PSCI_0_2: Final = PsciVersion.make(0, 2)
KVM_ARM_PSCI_1_0: Final = PsciVersion.make(1, 0)
KVM_ARM_PSCI_1_1: Final = PsciVersion.make(1, 1)
KVM_ARM_PSCI_1_2: Final = PsciVersion.make(1, 2)
KVM_ARM_PSCI_1_3: Final = PsciVersion.make(1, 3)
KNOWN_PSCI_VERSIONS: Final = (
    KVM_ARM_PSCI_0_1,
    KVM_ARM_PSCI_0_2,
    KVM_ARM_PSCI_1_0,
    KVM_ARM_PSCI_1_1,
    KVM_ARM_PSCI_1_2,
    KVM_ARM_PSCI_1_3,
)

ARM_SMCCC_VERSION_1_0: Final = 0x10000
ARM_SMCCC_VERSION_1_1: Final = 0x10001
ARM_SMCCC_VERSION_1_2: Final = 0x10002

# --- SMCCC ---------------------------------------------------------------------------------

SMCCC_FAST_CALL: Final = 1 << 31
SMCCC_SMC64: Final = 1 << 30
SMCCC_OWNER_SHIFT: Final = 24
SMCCC_OWNER_MASK: Final = 0x3F


class SmcccOwner(IntEnum):
    ARCH = 0
    CPU = 1
    SIP = 2
    OEM = 3
    STANDARD = 4
    STANDARD_HYP = 5
    VENDOR_HYP = 6


def smccc_owner(fid: int) -> int:
    return (fid >> SMCCC_OWNER_SHIFT) & SMCCC_OWNER_MASK


def smccc_is_64(fid: int) -> bool:
    return bool(fid & SMCCC_SMC64)


class Smccc(IntEnum):
    """Architecture-owner SMCCC function ids."""

    VERSION = 0x80000000
    ARCH_FEATURES = 0x80000001
    ARCH_WORKAROUND_1 = 0x80008000
    ARCH_WORKAROUND_2 = 0x80007FFF
    ARCH_WORKAROUND_3 = 0x80003FFF
    ARCH_WORKAROUND_4 = 0x80000004


class SmcccRet(IntEnum):
    SUCCESS = 0
    NOT_SUPPORTED = -1
    NOT_REQUIRED = -2
    INVALID_PARAMETER = -3


SMCCC_ARCH_WORKAROUND_RET_UNAFFECTED: Final = 1

# --- KVM vendor hypercalls and bitmap-gated services ---------------------------------------

KVM_VENDOR_HYP_FEATURES: Final = 0x86000000
KVM_VENDOR_HYP_PTP: Final = 0x86000001
KVM_VENDOR_HYP_CALL_UID: Final = 0x8600FF01
KVM_VENDOR_HYP_DISCOVER_IMPL_VER: Final = 0xC6000040
KVM_VENDOR_HYP_DISCOVER_IMPL_CPUS: Final = 0xC6000041
TRNG_IDS: Final = (0x84000050, 0x84000051, 0x84000052, 0x84000053, 0xC4000053)
PV_TIME_IDS: Final = (0xC5000020, 0xC5000021)
PV_TIME_FEATURES: Final = 0xC5000020

# --- PSCI ----------------------------------------------------------------------------------

PSCI_0_2_FN_BASE: Final = 0x84000000
PSCI_0_2_64BIT: Final = 0x40000000
KVM_PSCI_FN_BASE: Final = 0x95C1BA5E


class Psci01(IntEnum):
    """KVM's private PSCI 0.1 function ids."""

    CPU_SUSPEND = KVM_PSCI_FN_BASE
    CPU_OFF = KVM_PSCI_FN_BASE + 1
    CPU_ON = KVM_PSCI_FN_BASE + 2
    MIGRATE = KVM_PSCI_FN_BASE + 3


class PsciRet(IntEnum):
    SUCCESS = 0
    NOT_SUPPORTED = -1
    INVALID_PARAMS = -2
    DENIED = -3
    ALREADY_ON = -4
    ON_PENDING = -5
    INTERNAL_FAILURE = -6
    NOT_PRESENT = -7
    DISABLED = -8
    INVALID_ADDRESS = -9


PSCI_0_2_TOS_MP: Final = 2
PSCI_1_3_OFF_TYPE_HIBERNATE_OFF: Final = 1 << 0


class Gate(IntEnum):
    """How KVM services a standard PSCI function once the version allows it."""

    ALWAYS = 0
    NEVER = 1  # defined by PSCI, never implemented by KVM
    SYSTEM_SUSPEND_CAP = 2  # only when the VM enabled KVM_CAP_ARM_SYSTEM_SUSPEND


@dataclass(frozen=True)
class PsciFunction:
    """One standard PSCI function: number n, ids, the revision it appeared in, KVM's gate."""

    name: str
    n: int
    has64: bool
    since: int
    gate: Gate

    @property
    def id32(self) -> int:
        return PSCI_0_2_FN_BASE + self.n

    @property
    def id64(self) -> int | None:
        return PSCI_0_2_FN_BASE + PSCI_0_2_64BIT + self.n if self.has64 else None


_V02, _V10, _V11, _V13 = KVM_ARM_PSCI_0_2, KVM_ARM_PSCI_1_0, KVM_ARM_PSCI_1_1, KVM_ARM_PSCI_1_3
_A, _N, _S = Gate.ALWAYS, Gate.NEVER, Gate.SYSTEM_SUSPEND_CAP

#: The standard PSCI functions (docs/models/psci-firmware-registers.md §2.2, §2.3): name, n, has
#: SMC64 form, since, gate.
PSCI_FUNCTIONS: Final[tuple[PsciFunction, ...]] = (
    PsciFunction("PSCI_VERSION", 0, False, _V02, _A),
    PsciFunction("CPU_SUSPEND", 1, True, _V02, _A),
    PsciFunction("CPU_OFF", 2, False, _V02, _A),
    PsciFunction("CPU_ON", 3, True, _V02, _A),
    PsciFunction("AFFINITY_INFO", 4, True, _V02, _A),
    PsciFunction("MIGRATE", 5, True, _V02, _N),
    PsciFunction("MIGRATE_INFO_TYPE", 6, False, _V02, _A),
    PsciFunction("MIGRATE_INFO_UP_CPU", 7, True, _V02, _N),
    PsciFunction("SYSTEM_OFF", 8, False, _V02, _A),
    PsciFunction("SYSTEM_RESET", 9, False, _V02, _A),
    PsciFunction("PSCI_FEATURES", 10, False, _V10, _A),
    PsciFunction("CPU_FREEZE", 11, False, _V10, _N),
    PsciFunction("CPU_DEFAULT_SUSPEND", 12, True, _V10, _N),
    PsciFunction("NODE_HW_STATE", 13, True, _V10, _N),
    PsciFunction("SYSTEM_SUSPEND", 14, True, _V10, _S),
    PsciFunction("PSCI_SET_SUSPEND_MODE", 15, False, _V10, _N),
    PsciFunction("PSCI_STAT_RESIDENCY", 16, True, _V10, _N),
    PsciFunction("PSCI_STAT_COUNT", 17, True, _V10, _N),
    PsciFunction("SYSTEM_RESET2", 18, True, _V11, _A),
    PsciFunction("MEM_PROTECT", 19, False, _V11, _N),
    PsciFunction("MEM_PROTECT_CHECK_RANGE", 20, True, _V11, _N),
    PsciFunction("SYSTEM_OFF2", 21, True, _V13, _A),
)

_BY_ID: Final[dict[int, PsciFunction]] = {}
for _fn in PSCI_FUNCTIONS:
    _BY_ID[_fn.id32] = _fn
    if _fn.id64 is not None:
        _BY_ID[_fn.id64] = _fn

PSCI_ID: Final[dict[str, int]] = {fn.name: fn.id32 for fn in PSCI_FUNCTIONS}
PSCI_ID64: Final[dict[str, int]] = {fn.name: fn.id64 for fn in PSCI_FUNCTIONS if fn.id64}


def psci_function(fid: int) -> PsciFunction | None:
    """The standard PSCI function with this id (either width), or None."""
    return _BY_ID.get(fid)


def kvm_implements(fid: int, version: int, *, system_suspend: bool = False) -> bool:
    """Whether KVM services standard PSCI id ``fid`` for a vCPU whose version is ``version``.

    This is also exactly the PSCI_FEATURES answer "0" for a 1.x vCPU (apart from
    ``SMCCC_VERSION``, which PSCI_FEATURES reports separately).
    """
    fn = _BY_ID.get(fid)
    if fn is None or version < KVM_ARM_PSCI_0_2 or version < fn.since:
        return False
    if fn.gate is Gate.NEVER:
        return False
    if fn.gate is Gate.SYSTEM_SUSPEND_CAP:
        return system_suspend
    return True
