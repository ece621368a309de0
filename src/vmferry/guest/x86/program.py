"""How vmferry's x86-64 guest is laid out in guest-physical memory, and its arithmetic.

The guest runs the program of ``workload.s`` (assembled by :mod:`.asm`) at CPL3 in long
mode.  Low memory holds what the host prepares once, before the first entry::

    0x0000_1000  GDT (null, kernel code/data, user code/data, a 64-bit TSS descriptor)
    0x0000_1800  the TSS (zeros)
    0x0000_2000  PML4, then the PDPT at 0x3000 and four page directories at 0x4000-0x7fff:
                 the first 4 GiB identity-mapped with 2 MiB pages, user-accessible
    0x0000_8000  mailbox: 64 bytes a vCPU, written by the host (rate and pattern)
    0x0000_9000  status: 64 bytes a vCPU, written by the guest (counter, checksum)
    0x0000_a000  the program
    0x0010_0000  the data regions the vCPUs dirty, RAM split evenly among them

The MMIO doorbell sits at :data:`DOORBELL`, above RAM and outside any memory slot.
Guest RAM is at most :data:`MAX_RAM` so the doorbell and KVM's TSS pages stay outside it.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from importlib import resources

import numpy as np

from vmferry.errors import ConfigError
from vmferry.guest.workload import WorkloadSpec
from vmferry.guest.x86.asm import Program, assemble

PAGE = 4096
MIB = 1024 * 1024
GIB = 1024 * MIB
GDT = 0x1000
TSS = 0x1800
PML4 = 0x2000
PDPT = 0x3000
PD = 0x4000
MAILBOX = 0x8000
STATUS = 0x9000
CODE = 0xA000
DATA = 0x10_0000
SLOT = 64
MAX_VCPUS = PAGE // SLOT
DOORBELL = 0xFFE0_0000
TSS_ADDR = 0xFFFB_D000  # KVM_SET_TSS_ADDR (three pages)
IDENTITY_MAP_ADDR = 0xFFFB_C000  # KVM_SET_IDENTITY_MAP_ADDR (one page)
MAX_RAM = 3 * GIB
MIN_RAM = 4 * MIB

#: selectors of the GDT below (RPL 3 for the user ones)
USER_CS = 0x1B
USER_SS = 0x23
TSS_SEL = 0x28

LCG_A = 6364136223846793005
LCG_C = 1442695040888963407
U64 = (1 << 64) - 1

# mailbox offsets (see workload.s)
MB_TICKS, MB_BASE, MB_PAGES, MB_HOT_PAGES, MB_HOT_THRESHOLD, MB_SEQUENTIAL, MB_MAX_LAG = (
    0, 8, 16, 24, 32, 40, 48)
_MAILBOX = struct.Struct("<7Q")
_STATUS = struct.Struct("<QQ")
#: backlog a vCPU may catch up after it was stopped, in seconds of writes
MAX_LAG_S = 0.05


@functools.cache
def workload_program() -> Program:
    """The assembled workload (``workload.s``), loaded at :data:`CODE`."""
    source = resources.files("vmferry.guest.x86").joinpath("workload.s").read_text()
    return assemble(source, CODE)


def check_ram(size: int, vcpus: int) -> None:
    if not MIN_RAM <= size <= MAX_RAM:
        raise ConfigError(f"x86_64 guest RAM must be {MIN_RAM // MIB} MiB to "
                          f"{MAX_RAM // MIB} MiB, not {size // MIB} MiB")
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"x86_64 guests have 1 to {MAX_VCPUS} vCPUs, not {vcpus}")


def seed_of(seed: int, vcpu: int) -> int:
    """x_0 of vCPU ``vcpu``'s generator."""
    return (seed * 0x9E3779B97F4A7C15 + vcpu * 0xBF58476D1CE4E5B9 + 1) & U64


def region(size: int, vcpus: int, vcpu: int) -> tuple[int, int]:
    """(guest-physical base, pages) of the data region vCPU ``vcpu`` dirties."""
    pages = (size - DATA) // PAGE // vcpus
    return DATA + vcpu * pages * PAGE, pages


def gdt_bytes() -> bytes:
    entries = [
        0,
        0x00AF9A000000FFFF,  # kernel code, 64-bit
        0x00CF92000000FFFF,  # kernel data
        0x00AFFA000000FFFF,  # user code, 64-bit, DPL 3
        0x00CFF2000000FFFF,  # user data, DPL 3
    ]
    limit = 0x67
    low = (limit & 0xFFFF) | ((TSS & 0xFFFFFF) << 16) | (0x8B << 40) | ((TSS >> 24) << 56)
    return struct.pack("<5Q", *entries) + struct.pack("<QQ", low, TSS >> 32)


def page_tables() -> bytes:
    """PML4, PDPT and four page directories (0x2000-0x7fff), identity 4 GiB, 2 MiB pages,
    present, writable and user-accessible."""
    pml4 = np.zeros(512, np.uint64)
    pml4[0] = PDPT | 0x7
    pdpt = np.zeros(512, np.uint64)
    pdpt[:4] = [PD + i * PAGE | 0x7 for i in range(4)]
    pds = (np.arange(4 * 512, dtype=np.uint64) * np.uint64(2 * MIB)) | np.uint64(0x87)
    return pml4.tobytes() + pdpt.tobytes() + pds.tobytes()


def image() -> list[tuple[int, bytes]]:
    """What the host writes into guest memory before the first entry: (gpa, bytes)."""
    return [(GDT, gdt_bytes()), (PML4, page_tables()), (CODE, workload_program().code)]


@dataclass(frozen=True)
class Pacing:
    """The mailbox contents of one vCPU."""

    ticks_per_page: int
    base: int
    pages: int
    hot_pages: int
    hot_threshold: int
    sequential: bool
    max_lag: int

    def pack(self) -> bytes:
        return _MAILBOX.pack(self.ticks_per_page, self.base, self.pages, self.hot_pages,
                             self.hot_threshold, int(self.sequential), self.max_lag)

    @classmethod
    def unpack(cls, data: bytes) -> Pacing:
        t, b, p, hp, th, seq, lag = _MAILBOX.unpack_from(data)
        return cls(t, b, p, hp, th, bool(seq), lag)


def pacing(spec: WorkloadSpec, size: int, vcpus: int, vcpu: int, tsc_hz: int,
           throttle_pct: int = 0) -> Pacing:
    """Mailbox contents that make vCPU ``vcpu`` dirty its share of ``spec``'s rate."""
    base, pages = region(size, vcpus, vcpu)
    rate = spec.dirty_rate_mbps * (100 - throttle_pct) / 100 / vcpus  # MB/s per vCPU
    ticks = 0 if rate <= 0 else max(1, round(tsc_hz * PAGE / (rate * 1000000.0)))
    hot_pages = max(1, min(pages, int(pages * spec.hot_fraction)))
    threshold = round(spec.hot_weight * 256) if spec.pattern == "hot" else 0
    return Pacing(ticks, base, pages, hot_pages, threshold, spec.pattern == "sequential",
                  max(1, int(tsc_hz * MAX_LAG_S)))


def initial_regs(vcpu: int, seed: int) -> dict[str, int]:
    """General registers of vCPU ``vcpu`` at its first entry (see ``workload.s``)."""
    return {
        "rip": CODE, "rflags": 0x2, "rsp": 0,
        "r15": MAILBOX + vcpu * SLOT, "r14": STATUS + vcpu * SLOT, "rbx": DOORBELL,
        "r13": 0, "r12": 0, "r11": seed_of(seed, vcpu), "r10": 0, "r9": 0,
    }


def read_status(status_page: bytes, vcpu: int) -> tuple[int, int]:
    """(counter, checksum) vCPU ``vcpu`` last stored."""
    counter, checksum = _STATUS.unpack_from(status_page, vcpu * SLOT)
    return int(counter), int(checksum)


def expected(seed: int, vcpu: int, counter: int) -> tuple[int, int]:
    """(x_n, checksum) after ``counter`` steps of vCPU ``vcpu``: the host's recomputation.

    Computed by squaring the step's affine map, so it costs O(log n) for any counter: the
    map x -> a*x + c taken m times, with the sum of the m values it produces being
    p*x + q, composes as (a, c, p, q) below."""
    x0 = seed_of(seed, vcpu)
    # identity (0 steps) and one step
    acc = (1, 0, 0, 0)
    step = (LCG_A, LCG_C, LCG_A, LCG_C)
    n = counter
    while n:
        if n & 1:
            acc = _then(acc, step)
        step = _then(step, step)
        n >>= 1
    a, c, p, q = acc
    return (a * x0 + c) & U64, (p * x0 + q) & U64


def _then(first: tuple[int, int, int, int],
          second: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``first`` steps, then ``second`` steps, as one (a, c, p, q)."""
    a1, c1, p1, q1 = first
    a2, c2, p2, q2 = second
    return ((a2 * a1) & U64, (a2 * c1 + c2) & U64, (p1 + p2 * a1) & U64,
            (q1 + p2 * c1 + q2) & U64)
