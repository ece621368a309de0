"""Pre-flight compatibility for arm64 guests: decide before any RAM moves.

Theory of operation
-------------------
QEMU learns that a destination cannot take a guest only while loading the "cpu" section,
after the source has stopped the guest; and some incompatible migrations load fine and
leave the guest silently without a Spectre mitigation (docs/models/psci-firmware-registers.md
§6.6).  Pre-flight moves every
check it can see to before the first RAM page:

1. The **destination** describes itself (:func:`describe_destination`): it builds a scratch
   VM on its own host model, initialises a vCPU exactly as for a real incoming VM, and
   *probes* its one-reg interface: its sorted cpreg list with initial values, and for each
   firmware register which candidate values ``KVM_SET_ONE_REG`` accepts (PSCI versions and
   out-of-range words, every WA encoding 0..0x1F, each bitmap bit).  It adds what the host
   really provides per workaround.  No rule table: the answers come from the model.
2. The **source** describes the guest (:func:`describe_source`): its saved cpreg lists, the
   guest's boot-time firmware view and what the source host provides.
3. :func:`decide` runs the destination's own strict merge on the incoming lists, checks
   every incoming firmware value against the probed acceptance, predicts the PSCI version
   the guest will be given, and judges the guest's boot-time decisions against the
   destination's protection.  Verdicts: PROCEED, REFUSE (register, value, reason), or
   DEGRADED (the guest would lose a mitigation: refused unless ``allow_degraded``).

The destination's description crosses the control connection as a JSON object, on the
persist contract: :class:`DestinationCaps` is its plain state, ``to_json`` cannot fail and
``from_json`` raises a typed decode error naming the key that is wrong
(:class:`~vmferry.errors.BadMagic`, :class:`~vmferry.errors.UnsupportedVersion`,
:class:`~vmferry.errors.MalformedRecord`).  Version 2 (this release)::

    {"format": "vmferry.arm64-destination-caps", "version": 2,
     "profile": str, "kernel": str, "reg_ids": [int], "initial": [int],
     "accepts": {"0x<register id, 16 hex digits>": {"mask": int}
                                                | {"values": [int], "probed": [int]}},
     "protection": {"wa1"|"wa2"|"wa3": Protection value}, "psci_default": int,
     "merge_mode": "strict"|"classic"}

Enums go by name (workarounds) or by their string value (protection, merge mode), never by
position.  Version 1 (releases before) is the same object without ``format`` and
``version``; it is still read, and a source of that release reads version 2 (it ignores
keys it does not know), so neither side needs to announce what it reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, TypeVar

from vmferry.errors import BadMagic, MalformedRecord, UnsupportedVersion
from vmferry.guest.psci_client import Arm64Guest, BootView, lost, statuses
from vmferry.guest.psci_client import Decision as BootDecision
from vmferry.hw.kvm import psci as P
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import KvmError, KvmVcpu, Protection, Workaround
from vmferry.machine.arm64 import (
    Arm64Machine,
    Arm64State,
    CpregList,
    CpuLoadError,
    MergeMode,
    check_length,
    explain_unknown,
    merge_cpregs,
    qemu72_load_error,
    unknown_registers,
)
from vmferry.machine.profiles import HostProfile

#: Values probed on the destination for PSCI_VERSION: every version plus invalid words.
PSCI_CANDIDATES: Final = (0x0, *P.KNOWN_PSCI_VERSIONS, 0x10004, 0x20000)
WA_CANDIDATES: Final = (*range(0x20), 0x20, 0x100)
BITMAP_PROBE_BITS: Final = 64

CAPS_FORMAT: Final = "vmferry.arm64-destination-caps"
CAPS_VERSION: Final = 2
#: versions ``DestinationCaps.from_json`` reads (1: no format/version keys)
CAPS_READS: Final = frozenset({1, CAPS_VERSION})
_WHAT: Final = "malformed destination capabilities"

WA_NAMES: Final = {Workaround.WA1: "Spectre-v2 (SMCCC_ARCH_WORKAROUND_1)",
                   Workaround.WA2: "Spectre-v4/SSB (SMCCC_ARCH_WORKAROUND_2)",
                   Workaround.WA3: "Spectre-BHB (SMCCC_ARCH_WORKAROUND_3)"}


# --- destination capabilities -----------------------------------------------------------------


@dataclass(frozen=True)
class Acceptance:
    """Values the destination's SET accepted when probed: an explicit set, or a bit mask."""

    values: frozenset[int] = frozenset()
    mask: int | None = None  # bitmaps: value accepted iff value & ~mask == 0
    probed: frozenset[int] = frozenset()  # the candidate domain (explicit kind)

    def accepts(self, value: int) -> bool:
        if self.mask is not None:
            return value & ~self.mask == 0
        return value in self.values

    def to_json(self) -> dict[str, Any]:
        if self.mask is not None:
            return {"mask": self.mask}
        return {"values": sorted(self.values), "probed": sorted(self.probed)}

    @classmethod
    def from_json(cls, data: object, where: str = "accepts") -> Acceptance:
        """MalformedRecord naming ``where`` and the key unless ``data`` is one of the two
        shapes ``to_json`` writes."""
        obj = _object(data, where)
        if "mask" in obj:
            return cls(mask=_int(obj["mask"], f"{where}.mask"))
        return cls(frozenset(_ints(_field(obj, "values", where), f"{where}.values")),
                   probed=frozenset(_ints(_field(obj, "probed", where), f"{where}.probed")))


@dataclass(frozen=True)
class DestinationCaps:
    """What a destination host told the source about itself (probed, serialisable)."""

    profile: str
    kernel: str
    own: CpregList
    accepts: Mapping[int, Acceptance]
    protection: Mapping[Workaround, Protection]
    psci_default: int
    merge_mode: MergeMode = MergeMode.STRICT

    def to_json(self) -> dict[str, Any]:
        """The version-2 object (module docstring); cannot fail."""
        return {
            "format": CAPS_FORMAT, "version": CAPS_VERSION,
            "profile": self.profile, "kernel": self.kernel,
            "reg_ids": list(self.own.ids), "initial": list(self.own.values),
            "accepts": {f"{rid:#018x}": a.to_json() for rid, a in self.accepts.items()},
            "protection": {wa.key: p.value for wa, p in self.protection.items()},
            "psci_default": self.psci_default, "merge_mode": self.merge_mode.value,
        }

    @classmethod
    def from_json(cls, data: object) -> DestinationCaps:
        """Read version 2 or 1; BadMagic (a foreign object), UnsupportedVersion or
        MalformedRecord naming the key otherwise."""
        obj = _object(data, "destination capabilities")
        version = obj.get("version", 1)
        if version not in CAPS_READS or isinstance(version, bool):
            raise UnsupportedVersion(f"destination capabilities: version {version!r} (this "
                                     f"build reads {sorted(CAPS_READS)})")
        if version >= 2 and obj.get("format") != CAPS_FORMAT:
            raise BadMagic(f"destination capabilities: format {obj.get('format')!r}, "
                           f"expected {CAPS_FORMAT!r}")
        accepts = _object(_field(obj, "accepts"), "accepts")
        protection = _object(_field(obj, "protection"), "protection")
        return cls(
            profile=_str(_field(obj, "profile"), "profile"),
            kernel=_str(_field(obj, "kernel"), "kernel"),
            own=_cpregs(_field(obj, "reg_ids"), _field(obj, "initial")),
            accepts={_reg_id(k): Acceptance.from_json(v, f"accepts[{k}]")
                     for k, v in accepts.items()},
            protection={_by_name(Workaround, k, "protection"):
                        _by_value(Protection, v, f"protection[{k}]")
                        for k, v in protection.items()},
            psci_default=_int(_field(obj, "psci_default"), "psci_default"),
            merge_mode=_by_value(MergeMode, _field(obj, "merge_mode"), "merge_mode"),
        )


# --- the JSON decoder's checks: each raises MalformedRecord naming the key -------------------

E = TypeVar("E", bound=Enum)


def _bad(where: str, why: str) -> MalformedRecord:
    return MalformedRecord(f"{_WHAT}: {where}: {why}")


def _object(data: object, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise _bad(where, f"expected an object, got {type(data).__name__}")
    return data


def _field(obj: Mapping[str, Any], key: str, where: str = "") -> Any:
    if key not in obj:
        raise _bad(f"{where}.{key}" if where else key, "missing")
    return obj[key]


def _int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(where, f"expected an integer, got {value!r}")
    return value


def _ints(value: object, where: str) -> list[int]:
    if not isinstance(value, list):
        raise _bad(where, f"expected a list, got {type(value).__name__}")
    return [_int(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, f"expected a string, got {value!r}")
    return value


def _reg_id(key: str) -> int:
    try:
        return int(key, 16)
    except ValueError:
        raise _bad(f"accepts[{key}]", "not a hexadecimal register id") from None


def _cpregs(ids: object, initial: object) -> CpregList:
    reg_ids, values = _ints(ids, "reg_ids"), _ints(initial, "initial")
    if len(reg_ids) != len(values):
        raise _bad("initial", f"{len(values)} values for {len(reg_ids)} registers")
    return CpregList(tuple(reg_ids), tuple(values))


def _by_name(cls: type[E], key: str, where: str) -> E:
    try:
        return cls[key.upper()]
    except KeyError:
        raise _bad(where, f"{key!r} is not a {cls.__name__}") from None


def _by_value(cls: type[E], value: object, where: str) -> E:
    try:
        return cls(value)
    except ValueError:
        raise _bad(where, f"{value!r} is not a {cls.__name__}") from None


def describe_destination(profile: HostProfile, *, psci_pin: int | None = None) -> DestinationCaps:
    """Run on the destination host: probe a scratch VM built like the incoming one."""
    scratch = Arm64Machine(profile, psci_pin=psci_pin)
    own = scratch.cpregs[0]
    accepts = {rid: _probe_register(profile, rid, psci_pin)
               for rid in own.ids if R.is_firmware(rid)}
    return DestinationCaps(profile.name, profile.kernel, own, accepts, scratch.protection(),
                           scratch.psci_version())


def _probe_register(profile: HostProfile, rid: int, psci_pin: int | None) -> Acceptance:
    if rid in R.BITMAP_REGS:
        vcpu = Arm64Machine(profile, psci_pin=psci_pin).port(0)
        mask = 0
        for bit in range(BITMAP_PROBE_BITS):
            if _set_ok(vcpu, rid, 1 << bit):
                mask |= 1 << bit
        return Acceptance(mask=mask)
    # A SET of PSCI_VERSION or a WA register changes nothing that decides whether another
    # value is accepted, so one scratch vCPU per register serves the whole domain.
    vcpu = Arm64Machine(profile, psci_pin=psci_pin).port(0)
    domain = PSCI_CANDIDATES if rid == R.KVM_REG_ARM_PSCI_VERSION else WA_CANDIDATES
    accepted = frozenset(v for v in domain if _set_ok(vcpu, rid, v))
    return Acceptance(accepted, probed=frozenset(domain))


def _set_ok(vcpu: KvmVcpu, rid: int, value: int) -> bool:
    try:
        vcpu.set_one_reg(rid, value)
    except KvmError:
        return False
    return True


# --- source description -----------------------------------------------------------------------


@dataclass(frozen=True)
class SourceState:
    """What the source knows before migrating: saved registers and the guest's view."""

    profile: str
    state: Arm64State
    view: BootView | None
    protection: Mapping[Workaround, Protection]


def describe_source(machine: Arm64Machine, guest: Arm64Guest) -> SourceState:
    """Run on the source host, before any RAM moves (the guest keeps running)."""
    return SourceState(machine.profile.name, machine.save(), guest.view, machine.protection())


# --- decision ---------------------------------------------------------------------------------


class Verdict(Enum):
    PROCEED = "proceed"
    REFUSE = "refuse"
    DEGRADED = "degraded"


@dataclass(frozen=True)
class Decision:
    """Pre-flight result.  REFUSE names the register/value/reason; DEGRADED the loss path."""

    verdict: Verdict
    reason: str
    register: int | None = None
    value: int | None = None
    lost: tuple[Workaround, ...] = ()
    loss_path: str = ""
    notes: tuple[str, ...] = field(default=())
    psci_before: int | None = None
    psci_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value, "reason": self.reason,
            "register": None if self.register is None else R.register_name(self.register),
            "register_id": None if self.register is None else f"{self.register:#018x}",
            "value": None if self.value is None else f"{self.value:#x}",
            "lost": [wa.key for wa in self.lost], "loss_path": self.loss_path,
            "notes": list(self.notes),
        }


def decide(source: SourceState, dest: DestinationCaps, allow_degraded: bool = False) -> Decision:
    """The pre-flight verdict for migrating ``source`` to ``dest`` (see module docstring)."""
    refusal = _register_refusal(source.state, dest)
    if refusal is not None:
        return refusal
    stream = source.state.vcpus[0].cpregs
    psci_after = _predicted_psci(stream, dest)
    notes = _psci_notes(source.view, psci_after)
    if source.view is None:
        return Decision(Verdict.PROCEED, "guest not booted", notes=notes, psci_after=psci_after)
    before = statuses(source.view, source.protection)
    after = statuses(source.view, dest.protection)
    gone = tuple(lost(before, after))
    if not gone:
        return Decision(Verdict.PROCEED, "compatible", notes=notes,
                         psci_before=source.view.psci_version, psci_after=psci_after)
    return _degraded(source, stream, dest, gone, notes, psci_after, allow_degraded)


def _register_refusal(state: Arm64State, dest: DestinationCaps) -> Decision | None:
    for vcpu in state.vcpus:
        try:
            check_length(dest.own, len(vcpu.cpregs.ids), dest.merge_mode)
            merged = merge_cpregs(dest.own, vcpu.cpregs, dest.merge_mode)
        except CpuLoadError as exc:
            exc = explain_unknown(exc, dest.own, vcpu.cpregs, dest.merge_mode)
            what = R.register_name(exc.rid) if exc.rid is not None else "a register"
            return Decision(Verdict.REFUSE,
                            f"destination {dest.profile} (Linux {dest.kernel}) does not know "
                            f"{what}; {_qemu_would(dest.own, vcpu.cpregs)}", exc.rid, exc.value)
        for rid, value in vcpu.cpregs.items():
            acc = dest.accepts.get(rid)
            if acc is not None and merged.merged.get(rid) is not None and not acc.accepts(value):
                return Decision(Verdict.REFUSE, _reject_reason(rid, value, dest), rid, value)
    return None


def _qemu_would(own: CpregList, incoming: CpregList) -> str:
    """What a QEMU 7.2 destination would do with this cpreg list, in its own words."""
    unknown = unknown_registers(own, incoming)
    fw = ", ".join(R.register_name(r) for r in unknown if R.is_firmware(r)) or "none"
    carries = (f"the stream carries {len(incoming.ids)} registers, {len(unknown)} of them "
               f"unknown there (firmware: {fw})")
    lines = qemu72_load_error(own, incoming)
    if not lines:
        return (f"{carries}; QEMU 7.2 would load it after the source stopped and silently "
                f"drop the {len(unknown)} unknown registers")
    return f"{carries}; QEMU 7.2 would fail after the source stopped: " + " / ".join(lines)


def _reject_reason(rid: int, value: int, dest: DestinationCaps) -> str:
    where = f"destination {dest.profile} (Linux {dest.kernel})"
    if rid == R.KVM_REG_ARM_PSCI_VERSION:
        return (f"{where} does not implement PSCI {P.PsciVersion.name(value)}; "
                "pin a version it supports on the source")
    if rid in R.WORKAROUND_REGS:
        return f"{where} is less protected: workaround level {value:#x} exceeds its own"
    return f"{where} does not support hypercall bitmap bits {value:#x}"


def _predicted_psci(stream: CpregList, dest: DestinationCaps) -> int:
    incoming = stream.get(R.KVM_REG_ARM_PSCI_VERSION)
    if incoming is not None and R.KVM_REG_ARM_PSCI_VERSION in dest.own.ids:
        return incoming
    return dest.psci_default


def _psci_notes(view: BootView | None, psci_after: int) -> tuple[str, ...]:
    if view is None or view.psci_version == psci_after:
        return ()
    before, after = P.PsciVersion.name(view.psci_version), P.PsciVersion.name(psci_after)
    kind = "upgrade" if psci_after > view.psci_version else "downgrade"
    return (f"PSCI {kind} {before} -> {after} (guest keeps its boot-time discovery)",)


def _degraded(source: SourceState, stream: CpregList, dest: DestinationCaps,
              gone: tuple[Workaround, ...], notes: tuple[str, ...], psci_after: int,
              allow: bool) -> Decision:
    assert source.view is not None
    wa = gone[0]
    decision = source.view.decision(wa)
    in_stream = stream.get(wa.reg) is not None
    path = ("6.6/1: no workaround register in the stream (source kernel predates it), "
            "destination host less protected" if not in_stream else
            "workaround register accepted but the guest's boot-time decision is not honoured")
    was = statuses(source.view, source.protection)[wa].value
    reason = (f"guest would silently lose {WA_NAMES[wa]} protection: {was} on the source "
              f"(boot-time decision '{decision.value}'), vulnerable on {dest.profile}, which "
              f"provides '{dest.protection[wa].value}'")
    if decision is not BootDecision.FIRMWARE_CALLS:
        reason += "; the guest installed no workaround calls and never re-probes"
    verdict = Verdict.DEGRADED if allow else Verdict.REFUSE
    return Decision(verdict, reason, wa.reg, stream.get(wa.reg), gone, path, notes,
                     source.view.psci_version, psci_after)
