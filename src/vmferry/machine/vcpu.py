"""Virtual CPUs: a register file per vCPU and a run/pause switch.

Registers are addressed by a 64-bit id (for arm64 these are the KVM ``KVM_REG_ARM64``
one-reg ids; the architecture-neutral core set below uses small ids of its own).  Values
are unsigned 64-bit integers.  A running vCPU's registers change as guest time passes
(:meth:`Vcpu.advance`), so a migration that forgot them would be caught by verification.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import xxhash

from vmferry.errors import ConfigError

U64 = (1 << 64) - 1

#: The architecture-neutral core register set: 16 general registers, pc, sp, flags and a
#: guest cycle counter.  Ids are local to the ``generic`` architecture.
CORE_REGS: Mapping[str, int] = {
    **{f"r{i}": i for i in range(16)},
    "pc": 0x10,
    "sp": 0x11,
    "flags": 0x12,
    "cycles": 0x13,
}
CORE_REG_NAMES: Mapping[int, str] = {v: k for k, v in CORE_REGS.items()}


class RunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"


@dataclass(frozen=True)
class VcpuState:
    """Saved registers of one vCPU, sorted by id."""

    index: int
    regs: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        for reg, value in self.regs:
            if not (0 <= reg <= U64 and 0 <= value <= U64):
                raise ConfigError(f"vCPU {self.index}: register {reg:#x}={value:#x} not u64")


class Vcpu:
    """One vCPU.  Invariant: every value in ``regs`` is an unsigned 64-bit integer."""

    def __init__(self, index: int, regs: Mapping[int, int] | None = None) -> None:
        self.index = index
        self.regs: dict[int, int] = dict(regs) if regs is not None else self._reset_regs()
        self.state = RunState.PAUSED

    def _reset_regs(self) -> dict[int, int]:
        regs = dict.fromkeys(CORE_REGS.values(), 0)
        regs[CORE_REGS["pc"]] = 0x8000_0000
        regs[CORE_REGS["sp"]] = 0x4000_0000 - 0x1000 * self.index
        regs[CORE_REGS["r0"]] = self.index
        return regs

    def run(self) -> None:
        self.state = RunState.RUNNING

    def pause(self) -> None:
        self.state = RunState.PAUSED

    @property
    def running(self) -> bool:
        return self.state is RunState.RUNNING

    def get(self, reg: int) -> int:
        return self.regs[reg]

    def set(self, reg: int, value: int) -> None:
        if not 0 <= value <= U64:
            raise ConfigError(f"vCPU {self.index}: value {value:#x} for {reg:#x} is not u64")
        self.regs[reg] = value

    def advance(self, cycles: int) -> None:
        """Let ``cycles`` of guest time pass: the core registers move like a busy loop."""
        if not self.running or cycles <= 0:
            return
        r = self.regs
        c = CORE_REGS
        r[c["cycles"]] = (r.get(c["cycles"], 0) + cycles) & U64
        r[c["pc"]] = (r.get(c["pc"], 0) + 4 * (cycles % 4096)) & U64
        r[c["r1"]] = (r.get(c["r1"], 0) * 6364136223846793005 + cycles) & U64
        r[c["flags"]] = r[c["r1"]] >> 60

    def save(self) -> VcpuState:
        return VcpuState(self.index, tuple(sorted(self.regs.items())))

    def restore(self, state: VcpuState) -> None:
        self.regs = dict(state.regs)


def regs_digest(states: Iterable[VcpuState]) -> str:
    """A digest of every vCPU's registers; equal digests mean equal register files."""
    h = xxhash.xxh3_64()
    for st in sorted(states, key=lambda s: s.index):
        h.update(st.index.to_bytes(4, "little"))
        for reg, value in st.regs:
            h.update(reg.to_bytes(8, "little") + value.to_bytes(8, "little"))
    return h.hexdigest()
