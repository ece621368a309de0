"""PAPR hypercall numbers and return codes used by the TCE hypercalls.

Values are the kernel's (arch/powerpc/include/asm/hvcall.h).  The opcode travels in r3,
arguments in r4..r7; the return code comes back in r3 and output registers from r4 on.
``H_TOO_HARD`` is internal to KVM: it makes the vCPU exit to the VMM, which re-executes the
hypercall; a guest never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Hcall(IntEnum):
    H_GET_TCE = 0x1C
    H_PUT_TCE = 0x20
    H_STUFF_TCE = 0x138
    H_PUT_TCE_INDIRECT = 0x13C


class HRet(IntEnum):
    H_SUCCESS = 0
    H_BUSY = 1
    H_CLOSED = 2
    H_HARDWARE = -1
    H_FUNCTION = -2
    H_PRIVILEGE = -3
    H_PARAMETER = -4
    H_NOT_FOUND = -7
    H_TOO_HARD = 9999


H_GET_TCE = Hcall.H_GET_TCE
H_PUT_TCE = Hcall.H_PUT_TCE
H_STUFF_TCE = Hcall.H_STUFF_TCE
H_PUT_TCE_INDIRECT = Hcall.H_PUT_TCE_INDIRECT
H_SUCCESS = HRet.H_SUCCESS
H_BUSY = HRet.H_BUSY
H_CLOSED = HRet.H_CLOSED
H_HARDWARE = HRet.H_HARDWARE
H_FUNCTION = HRet.H_FUNCTION
H_PRIVILEGE = HRet.H_PRIVILEGE
H_PARAMETER = HRet.H_PARAMETER
H_NOT_FOUND = HRet.H_NOT_FOUND
H_TOO_HARD = HRet.H_TOO_HARD

#: number of argument registers (r4..) each TCE hypercall reads
HCALL_ARGC: dict[Hcall, int] = {
    Hcall.H_GET_TCE: 2,
    Hcall.H_PUT_TCE: 3,
    Hcall.H_STUFF_TCE: 4,
    Hcall.H_PUT_TCE_INDIRECT: 4,
}


@dataclass(frozen=True)
class HcallResult:
    """What the guest sees after a hypercall: r3 (``ret``) and r4.. (``out``)."""

    ret: int
    out: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.ret == HRet.H_SUCCESS
