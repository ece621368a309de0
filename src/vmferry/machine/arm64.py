"""The arm64 part of a VM: per-vCPU KVM firmware state on a host, saved as a QEMU cpreg list.

Theory of operation
-------------------
:class:`Arm64Machine` is what a VMM holds for an ``arch = "arm64"`` VM on one host
(:class:`~vmferry.machine.profiles.HostProfile`): a :class:`KvmVm`, its vCPUs initialised
with ``KVM_ARM_VCPU_PSCI_0_2`` (plus, optionally, a PSCI version pinned right after init,
QEMU's proposed ``kvm-psci-version``), and per vCPU the *cpreg list* QEMU keeps:
``KVM_GET_REG_LIST`` sorted ascending with CORE and SVE ids dropped, so the firmware
(``...0014xxxx``) and bitmap (``...0016xxxx``) registers always sit at the tail.

Persist contract: :meth:`Arm64Machine.save` (``cpu_pre_save``: GET every listed register)
-> :class:`Arm64State`; :func:`encode_state` / :func:`decode_state` for the stream;
:meth:`Arm64Machine.load` applies a state on the destination in one of two merge modes:

Section numbers (§) refer to ``docs/models/psci-firmware-registers.md``.

* ``classic`` -- QEMU before the 2025/2026 fix (§5.3): length gate
  ``src_len <= dst_len``; a walk that stops when *either* list ends, so unknown registers
  sorting after the destination's last one are **silently dropped**; an unknown register
  sorting before a known one fails; then every register is SET (failures reported after
  the loop, which continues);
* ``strict`` -- the 2025/2026 algorithm (§5.4): gate ``src_len <= dst_len + 10``, full
  walk, any unexpected register fails unless a tolerance (:data:`TOLERANCES`) admits it.

Load failures are :class:`CpuLoadError` naming the step, register, value and errno.  A
failed load leaves the destination VM never-run; the caller discards it.

Stream layout (big-endian)::

    "A64V" | u16 format=1 | u16 n_vcpus
    per vCPU: u16 index | u8 powered_off | u8 0
              core registers in struct kvm_regs order, each in its own width
              i32 len | len x u64 id | len x u64 value        (QEMU's cpreg section)
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from vmferry.errors import (
    ConfigError,
    InvariantViolation,
    MalformedRecord,
    MigrationError,
    ModelError,
    StreamDecodeError,
)
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import (
    KVM_ARM_VCPU_PSCI_0_2,
    FwFaults,
    KvmError,
    KvmVcpu,
    KvmVm,
    MpState,
    Protection,
    RegListTooSmall,
    Workaround,
    vm_protection,
)
from vmferry.hw.kvm.psci import PsciVersion
from vmferry.hw.persist import Field, Layout
from vmferry.machine.profiles import HostProfile

MAX_CPREG_VMSTATE_ANOMALIES: Final = 10
FULL_STATE_ONLY: Final = frozenset({R.KVM_REG_ARM_TIMER_CNT})


class MergeMode(Enum):
    CLASSIC = "classic"
    STRICT = "strict"


class Level(Enum):
    """``write_list_to_kvmstate`` levels: RUNTIME puts skip FULL_STATE-only registers."""

    RUNTIME = 1
    FULL = 2


class PowerState(Enum):
    """QEMU's view of a vCPU's PSCI power state (``ARMCPU::power_state``)."""

    ON = "on"
    OFF = "off"
    ON_PENDING = "on_pending"  # an asynchronous CPU_ON has not reached the vCPU yet


class PowerTransitionError(MigrationError):
    """QEMU's ``put_power``: a vCPU neither ON nor OFF cannot be saved."""


class CpuLoadError(ModelError):
    """Loading the "cpu" section failed on the destination (after the source stopped)."""

    def __init__(self, step: str, reason: str, rid: int | None = None,
                 value: int | None = None, err: int | None = None) -> None:
        self.step = step
        self.reason = reason
        self.rid = rid
        self.value = value
        self.errno = err
        where = f" {R.register_name(rid)} ({rid:#018x})" if rid is not None else ""
        val = f" = {value:#x}" if value is not None else ""
        super().__init__(f"{step}:{where}{val}: {reason}")


class Arm64InitError(ConfigError):
    """The VMM could not create the VM on this host (FAIL@init: e.g. an unsupported pin)."""


class Arm64StateDecodeError(MalformedRecord):
    """The arm64 component record is malformed."""


# --- tolerances (QEMU 2025/2026, docs/models/psci-firmware-registers.md §5.4)


@dataclass(frozen=True)
class Tolerance:
    """``not_on_both_ends``: may be absent on either side; else the stream-only register is
    accepted iff ``value & mask == expected``."""

    not_on_both_ends: bool = False
    mask: int = 0
    expected: int = 0

    def admits_unexpected(self, value: int) -> bool:
        return self.not_on_both_ends or (value & self.mask) == self.expected


TOLERANCES: Final[Mapping[int, Tolerance]] = {
    R.KVM_REG_ARM_VENDOR_HYP_BMAP_2: Tolerance(mask=(1 << 64) - 1, expected=0),
}


# --- cpreg lists ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpregList:
    """A cpreg list: ids with u64 values (U32 zero-extended).

    Lists a VMM builds itself are strictly ascending; an incoming list is taken as sent.
    """

    ids: tuple[int, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.values):
            raise ValueError("cpreg ids and values differ in length")

    def get(self, rid: int) -> int | None:
        try:
            return self.values[self.ids.index(rid)]
        except ValueError:
            return None

    def items(self) -> list[tuple[int, int]]:
        return list(zip(self.ids, self.values, strict=True))


_SYNCED_BY_HAND: Final = frozenset({int(R.Coproc.CORE), int(R.Coproc.SVE)})


def init_cpreg_list(vcpu: KvmVcpu) -> CpregList:
    """``kvm_arm_init_cpreg_list``: probe with n=0, sort, drop CORE/SVE, read every value."""
    try:
        vcpu.get_reg_list(0)
        raise InvariantViolation("KVM_GET_REG_LIST with n=0 did not return E2BIG")
    except RegListTooSmall as exc:
        n = exc.n_required
    ids = sorted(r for r in vcpu.get_reg_list(n) if R.coproc_of(r) not in _SYNCED_BY_HAND)
    for rid in ids:
        if R.reg_size(rid) not in (4, 8):
            raise Arm64InitError(f"register {rid:#018x} has unsupported size {R.reg_size(rid)}")
    try:
        values = tuple(vcpu.get_one_reg(r) for r in ids)
    except KvmError as exc:
        raise Arm64InitError(f"initial read of kernel register state failed: {exc}") from exc
    return CpregList(tuple(ids), values)


def write_list_to_kvmstate(vcpu: KvmVcpu, cpregs: CpregList, level: Level) -> list[KvmError]:
    """SET every listed register at ``level``; keeps going after a failure, returns them all."""
    failures: list[KvmError] = []
    for rid, value in cpregs.items():
        if level is Level.RUNTIME and rid in FULL_STATE_ONLY:
            continue
        width = R.reg_size(rid)
        try:
            vcpu.set_one_reg(rid, value & ((1 << (8 * width)) - 1))
        except KvmError as exc:
            failures.append(exc)
    return failures


@dataclass(frozen=True)
class MergeResult:
    """Outcome of merging an incoming list into the destination's own list."""

    merged: CpregList
    missing: tuple[int, ...] = ()  # destination-only: own (initial) value kept
    dropped: tuple[tuple[int, int], ...] = ()  # classic: trailing unknowns silently ignored
    tolerated: tuple[tuple[int, int], ...] = ()  # strict: unexpected but tolerated


def length_limit(own_len: int, mode: MergeMode) -> int:
    return own_len + (MAX_CPREG_VMSTATE_ANOMALIES if mode is MergeMode.STRICT else 0)


def check_length(own: CpregList, incoming_len: int, mode: MergeMode) -> None:
    """``VMSTATE_INT32_POSITIVE_LE`` on ``cpreg_vmstate_array_len``."""
    limit = length_limit(len(own.ids), mode)
    if incoming_len < 0 or incoming_len > limit:
        raise CpuLoadError("cpreg_vmstate_array_len",
                           f"Invalid value {incoming_len} expecting positive value <= {limit}",
                           err=errno.EINVAL)


def explain_unknown(exc: CpuLoadError, own: CpregList, incoming: CpregList,
                    mode: MergeMode) -> CpuLoadError:
    """The same failure, naming the first firmware register the destination does not know
    (and, in strict mode, does not tolerate), and how many unknown registers arrived."""
    known = set(own.ids)

    def tolerated(rid: int, value: int) -> bool:
        tol = TOLERANCES.get(rid)
        return mode is MergeMode.STRICT and tol is not None and tol.admits_unexpected(value)

    unknown = [(r, v) for r, v in incoming.items() if r not in known and not tolerated(r, v)]
    fw = [(r, v) for r, v in unknown if R.is_firmware(r)]
    if not unknown:
        return exc
    names = ", ".join(R.register_name(r) for r, _ in fw) or "none"
    rid, value = (fw or unknown)[0]
    return CpuLoadError(exc.step, f"{exc.reason} (stream carries {len(unknown)} registers "
                        f"unknown here; firmware: {names})", rid, value, exc.errno)


def qemu72_load_error(own: CpregList, incoming: CpregList) -> tuple[str, ...]:
    """The lines QEMU 7.2 (``classic``) prints when its "cpu" section load fails on a
    destination whose cpreg list is ``own``; empty when it would load (trailing unknown
    registers are then dropped silently).

    The length gate is ``VMSTATE_INT32_POSITIVE_LE`` against the destination's own list
    length (``kvm_arm_init_cpreg_list`` sets ``cpreg_vmstate_array_len`` to it), printed by
    ``get_int32_le``; a register unknown to the destination makes ``cpu_post_load`` return
    -1, which the loader reports as ``-EPERM``."""
    tail = ("error while loading state for instance 0x0 of device 'cpu'",)
    n = len(incoming.ids)
    if n > len(own.ids):
        return (f"Invalid value {n} expecting positive value <= {len(own.ids)}",
                "Failed to load cpu:cpreg_vmstate_array_len", *tail,
                "load of migration failed: Invalid argument")
    try:
        _merge_classic(own, incoming)
    except CpuLoadError:
        return (*tail, "load of migration failed: Operation not permitted")
    return ()


def unknown_registers(own: CpregList, incoming: CpregList) -> list[int]:
    """The incoming register ids the destination's list lacks (no tolerance applies)."""
    known = set(own.ids)
    return [r for r in incoming.ids if r not in known]


def merge_cpregs(own: CpregList, incoming: CpregList, mode: MergeMode) -> MergeResult:
    """``cpu_post_load``'s merge (classic or strict); CpuLoadError on an unknown register."""
    if mode is MergeMode.CLASSIC:
        return _merge_classic(own, incoming)
    return _merge_strict(own, incoming)


def _merge_classic(own: CpregList, inc: CpregList) -> MergeResult:
    values = list(own.values)
    missing: list[int] = []
    i = v = 0
    while i < len(own.ids) and v < len(inc.ids):
        if inc.ids[v] > own.ids[i]:
            missing.append(own.ids[i])
            i += 1
        elif inc.ids[v] < own.ids[i]:
            raise CpuLoadError("post_load merge", "register unknown to the destination",
                               inc.ids[v], inc.values[v], errno.EINVAL)
        else:
            values[i] = inc.values[v]
            i += 1
            v += 1
    missing.extend(own.ids[i:])
    dropped = tuple(zip(inc.ids[v:], inc.values[v:], strict=True))
    return MergeResult(CpregList(own.ids, tuple(values)), tuple(missing), dropped)


def _merge_strict(own: CpregList, inc: CpregList) -> MergeResult:
    own_index = {rid: n for n, rid in enumerate(own.ids)}
    values = list(own.values)
    tolerated: list[tuple[int, int]] = []
    for rid, value in inc.items():
        if rid in own_index:
            values[own_index[rid]] = value
            continue
        tol = TOLERANCES.get(rid)
        if tol is None or not tol.admits_unexpected(value):
            raise CpuLoadError("post_load merge", "register unknown to the destination",
                               rid, value, errno.EINVAL)
        tolerated.append((rid, value))
    incoming = set(inc.ids)
    missing = tuple(r for r in own.ids if r not in incoming)
    return MergeResult(CpregList(own.ids, tuple(values)), missing, (), tuple(tolerated))


# --- state ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm64VcpuState:
    index: int
    powered_off: bool
    core: tuple[int, ...]  # values in R.CORE_REGS order
    cpregs: CpregList


@dataclass(frozen=True)
class Arm64State:
    vcpus: tuple[Arm64VcpuState, ...]


@dataclass(frozen=True)
class LoadReport:
    """What a successful load did, per vCPU 0 (all vCPUs share the VM-wide registers)."""

    mode: MergeMode
    missing: tuple[int, ...] = ()
    dropped: tuple[tuple[int, int], ...] = ()
    tolerated: tuple[tuple[int, int], ...] = ()
    failed: tuple[tuple[int, int], ...] = ()  # faulty mode only: SETs that failed


# --- the machine ------------------------------------------------------------------------------


@dataclass
class Arm64Machine:
    """arm64 VM parts on one host; see module docstring."""

    profile: HostProfile
    n_vcpus: int = 1
    psci_pin: int | None = None
    faults: FwFaults = field(default_factory=FwFaults)

    def __post_init__(self) -> None:
        caps, mitigation = self.profile.arm64()
        if self.n_vcpus < 1:
            raise ConfigError("an arm64 VM needs at least one vCPU")
        self.vm = KvmVm(caps, mitigation, self.faults)
        self.vcpus = [self._create_vcpu() for _ in range(self.n_vcpus)]
        self.cpregs = [init_cpreg_list(v) for v in self.vcpus]
        self.started = False
        #: vCPUs with an asynchronous power-on in flight (QEMU's ON_PENDING)
        self.pending_on: set[int] = set()

    def _create_vcpu(self) -> KvmVcpu:
        vcpu = self.vm.create_vcpu()
        vcpu.vcpu_init({KVM_ARM_VCPU_PSCI_0_2})
        if self.psci_pin is not None:
            self._pin(vcpu, self.psci_pin)
        return vcpu

    def _pin(self, vcpu: KvmVcpu, version: int) -> None:
        if R.KVM_REG_ARM_PSCI_VERSION not in self.vm.caps.fw_regs:
            raise Arm64InitError(f"{self.profile.name}: kernel has no PSCI_VERSION register; "
                                 f"cannot pin PSCI {PsciVersion.name(version)}")
        try:
            vcpu.set_one_reg(R.KVM_REG_ARM_PSCI_VERSION, version)
        except KvmError as exc:
            raise Arm64InitError(f"{self.profile.name}: PSCI {PsciVersion.name(version)} "
                                 f"refused by the kernel ({exc.errno_name}); set the version "
                                 "on the migration source") from exc

    def pin_psci(self, version: int) -> None:
        """Pin the PSCI version of a VM that has not run yet, as if requested right after
        vCPU init (before the cpreg list is read); Arm64InitError if the kernel refuses."""
        if self.started:
            raise ModelError("PSCI version pinned after the VM has run")
        for vcpu in self.vcpus:
            self._pin(vcpu, version)
        self.psci_pin = version
        psci = R.KVM_REG_ARM_PSCI_VERSION
        self.cpregs = [CpregList(c.ids, tuple(v.get_one_reg(r) if r == psci else value
                                              for r, value in c.items()))
                       for v, c in zip(self.vcpus, self.cpregs, strict=True)]

    # -- runtime ----------------------------------------------------------------------------

    def port(self, index: int = 0) -> KvmVcpu:
        """The vCPU a guest issues hypercalls on."""
        return self.vcpus[index]

    def protection(self) -> dict[Workaround, Protection]:
        return vm_protection(self.vm)

    def put_registers(self, level: Level = Level.RUNTIME) -> None:
        """``kvm_arch_put_registers``: write every cpreg back (QEMU does it on every put)."""
        for vcpu, cpregs in zip(self.vcpus, self.cpregs, strict=True):
            failures = write_list_to_kvmstate(vcpu, cpregs, level)
            if failures:
                first = failures[0]
                raise CpuLoadError("put_registers", f"{first.errno_name}: {first.detail}",
                                   first.rid, first.value, first.errno)

    def start(self) -> None:
        """First put and first ``KVM_RUN`` of every vCPU: from here bitmaps are frozen."""
        self.put_registers(Level.RUNTIME)
        for vcpu in self.vcpus:
            vcpu.run()
        self.started = True

    def psci_version(self) -> int:
        return self.vcpus[0].effective_psci_version()

    # -- persist ----------------------------------------------------------------------------

    def power_state(self, index: int) -> PowerState:
        """QEMU's power state of vCPU ``index``: synced from KVM's mp_state, except while an
        asynchronous power-on (``arm_set_cpu_on``) has not run on the vCPU yet."""
        if index in self.pending_on:
            return PowerState.ON_PENDING
        stopped = self.vcpus[index].mp_state is MpState.STOPPED
        return PowerState.OFF if stopped else PowerState.ON

    def begin_power_on(self, index: int) -> None:
        """An asynchronous CPU_ON was queued for vCPU ``index`` (ON_PENDING until settled)."""
        if not 0 <= index < len(self.vcpus):
            raise ConfigError(f"no vCPU {index}")
        self.pending_on.add(index)

    def settle_power_on(self, index: int) -> None:
        """The queued power-on ran on the vCPU: it is ON."""
        if index in self.pending_on:
            self.pending_on.discard(index)
            self.vcpus[index].mp_state = MpState.RUNNABLE

    def save(self) -> Arm64State:
        """``cpu_pre_save`` and the vmstate: GET every listed register.

        Raises PowerTransitionError, as QEMU's ``put_power`` fails the save, when a vCPU is
        in a transitional power state; any other failure is an invariant violation."""
        transitional = [i for i in range(len(self.vcpus))
                        if self.power_state(i) is PowerState.ON_PENDING]
        if transitional:
            raise PowerTransitionError(
                f"vCPU {transitional[0]} is between power states (ON_PENDING): QEMU does not "
                "save a CPU in a PSCI power transition", "switchover (vCPU state)")
        out = []
        for vcpu, cpregs in zip(self.vcpus, self.cpregs, strict=True):
            try:
                values = tuple(vcpu.get_one_reg(r) for r in cpregs.ids)
            except KvmError as exc:
                raise InvariantViolation(
                    f"pre_save GET failed on a listed register: {exc}") from exc
            out.append(Arm64VcpuState(
                index=vcpu.index,
                powered_off=vcpu.mp_state is MpState.STOPPED,
                core=tuple(vcpu.core[r] for r in R.CORE_REGS.values()),
                cpregs=CpregList(cpregs.ids, values),
            ))
        return Arm64State(tuple(out))

    def load(self, state: Arm64State, mode: MergeMode = MergeMode.CLASSIC, *,
             continue_after_failed_post_load: bool = False) -> LoadReport:
        """Destination ``cpu_post_load`` for every vCPU; CpuLoadError on the first failure.

        ``continue_after_failed_post_load`` is the faulty mode of
        docs/models/psci-firmware-registers.md §8.3: failed SETs are
        reported in ``LoadReport.failed`` and the VM is left to start half-applied.
        """
        if self.started:
            raise ModelError("load into a VM that has already run")
        if len(state.vcpus) != len(self.vcpus):
            raise CpuLoadError("vcpu count", f"stream has {len(state.vcpus)} vCPUs, "
                               f"destination {len(self.vcpus)}")
        reports = [self._load_vcpu(n, s, mode, continue_after_failed_post_load)
                   for n, s in enumerate(state.vcpus)]
        return reports[0]

    def _load_vcpu(self, n: int, state: Arm64VcpuState, mode: MergeMode,
                   keep_going: bool) -> LoadReport:
        vcpu, own = self.vcpus[n], self.cpregs[n]
        try:
            check_length(own, len(state.cpregs.ids), mode)
        except CpuLoadError as exc:
            raise explain_unknown(exc, own, state.cpregs, mode) from None
        result = merge_cpregs(own, state.cpregs, mode)
        failures = write_list_to_kvmstate(vcpu, result.merged, Level.FULL)
        if failures and not keep_going:
            first = failures[0]
            raise CpuLoadError("set_one_reg", f"{first.errno_name}: {first.detail}", first.rid,
                               first.value, first.errno)
        for rid, value in zip(R.CORE_REGS.values(), state.core, strict=True):
            vcpu.core[rid] = value
        vcpu.mp_state = MpState.STOPPED if state.powered_off else MpState.RUNNABLE
        # Faulty mode only: the list now mirrors what the kernel holds (failed SETs reverted).
        self.cpregs[n] = CpregList(result.merged.ids, tuple(
            vcpu.get_one_reg(r) if r in {f.rid for f in failures} else v
            for r, v in result.merged.items())) if failures else result.merged
        return LoadReport(mode, result.missing, result.dropped, result.tolerated,
                          tuple((f.rid or 0, f.value or 0) for f in failures))

    def report(self) -> dict[str, object]:
        """Firmware view for the VM report: host, effective PSCI, firmware register values."""
        fw = {R.register_name(r): self.vcpus[0].get_one_reg(r) for r in self.vm.caps.fw_regs}
        return {
            "profile": self.profile.name,
            "mitigation": self.vm.host.label(),
            "psci_version": PsciVersion.name(self.psci_version()),
            "firmware_registers": {k: f"{v:#x}" for k, v in fw.items()},
        }


# --- encode / decode --------------------------------------------------------------------------

MAGIC: Final = b"A64V"
FORMAT: Final = 1
#: ``"A64V" | u16 format | u16 vcpus``, then the vCPUs (:mod:`vmferry.hw.persist`)
HEADER = Layout("arm64", MAGIC, FORMAT, (Field("vcpus", "u16"),))
_VCPU = struct.Struct(">HBB")
_LEN = struct.Struct(">i")


def encode_state(state: Arm64State) -> bytes:
    out = [HEADER.encode({"vcpus": len(state.vcpus)})]
    for vcpu in state.vcpus:
        out.append(_VCPU.pack(vcpu.index, int(vcpu.powered_off), 0))
        for rid, value in zip(R.CORE_REGS.values(), vcpu.core, strict=True):
            out.append(value.to_bytes(R.reg_size(rid), "big"))
        out.append(encode_cpregs(vcpu.cpregs))
    return b"".join(out)


def encode_cpregs(cpregs: CpregList) -> bytes:
    """QEMU's cpreg section: i32 len, len u64 ids, len u64 values (all big-endian)."""
    n = len(cpregs.ids)
    return _LEN.pack(n) + struct.pack(f">{n}Q", *cpregs.ids) + struct.pack(f">{n}Q",
                                                                         *cpregs.values)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise Arm64StateDecodeError(f"truncated {what}", self.pos)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk


def decode_state(data: bytes) -> Arm64State:
    """Strict inverse of :func:`encode_state`; Arm64StateDecodeError on malformed bytes."""
    rd = _Reader(bytes(data))
    try:
        head, rd.pos = HEADER.decode_head(data)
    except StreamDecodeError as exc:  # one error type for every malformed arm64 record
        err = Arm64StateDecodeError(str(exc))
        err.offset = exc.offset
        raise err from exc
    n = head["vcpus"]
    vcpus = tuple(_decode_vcpu(rd) for _ in range(n))
    if rd.pos != len(rd.data):
        raise Arm64StateDecodeError(f"{len(rd.data) - rd.pos} trailing bytes", rd.pos)
    return Arm64State(vcpus)


def _decode_vcpu(rd: _Reader) -> Arm64VcpuState:
    index, off, pad = _VCPU.unpack(rd.take(_VCPU.size, "vcpu header"))
    if off > 1 or pad:
        raise Arm64StateDecodeError("bad vcpu flags", rd.pos)
    core = tuple(int.from_bytes(rd.take(R.reg_size(r), "core register"), "big")
                 for r in R.CORE_REGS.values())
    return Arm64VcpuState(index, bool(off), core, _decode_cpregs(rd))


def decode_cpregs(data: bytes) -> CpregList:
    rd = _Reader(data)
    cpregs = _decode_cpregs(rd)
    if rd.pos != len(rd.data):
        raise Arm64StateDecodeError("trailing bytes after cpreg section", rd.pos)
    return cpregs


def _decode_cpregs(rd: _Reader) -> CpregList:
    (n,) = _LEN.unpack(rd.take(_LEN.size, "cpreg length"))
    if n < 0:
        raise Arm64StateDecodeError(f"negative cpreg length {n}", rd.pos)
    ids = struct.unpack(f">{n}Q", rd.take(8 * n, "cpreg ids"))
    values = struct.unpack(f">{n}Q", rd.take(8 * n, "cpreg values"))
    return CpregList(tuple(ids), tuple(values))
