"""An arm64 Linux guest's firmware discovery: PSCI, SMCCC and the Spectre workarounds.

Theory of operation
-------------------
At boot, like ``drivers/firmware/psci/psci.c`` and the arm64 proton-pack code, the guest:

1. calls PSCI_VERSION (only when its device tree says "arm,psci-0.2"; a 0.1 guest uses the
   private ids and never learns about SMCCC);
2. only if PSCI major >= 1, asks PSCI_FEATURES(SMCCC_VERSION); if that is not NOT_SUPPORTED
   it calls SMCCC_VERSION and records SMCCC 1.1 when the answer is >= 1.1;
3. only with SMCCC 1.1, asks SMCCC_ARCH_FEATURES(ARCH_WORKAROUND_n) for n = 1, 2, 3 and
   decides per workaround: 0 -> install the workaround calls; 1 (or NOT_REQUIRED) -> not
   needed; anything else -> no firmware mitigation (WA_2: use SSBS when the CPU has it).

The resulting :class:`BootView` is frozen.  The guest **never probes again**, in particular
not after a migration: its protection afterwards is its boot-time decisions judged against
whatever the new host really provides (:func:`judge`).  A workaround that was protected at
boot and is not any more is a silent loss.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from vmferry.errors import MalformedRecord, ModelError
from vmferry.hw.kvm import psci as P
from vmferry.hw.kvm.arm64_fw import Protection, Workaround


class HypercallPort(Protocol):
    """What the guest can do to its firmware: issue an HVC (a :class:`KvmVcpu` is one)."""

    def hvc(self, x0: int, x1: int = 0, x2: int = 0, x3: int = 0) -> tuple[int, int, int, int]:
        ...


class Decision(Enum):
    """What the guest decided at boot for one workaround."""

    FIRMWARE_CALLS = "firmware-calls"  # ARCH_FEATURES said 0: issue ARCH_WORKAROUND_n
    NOT_NEEDED = "not-needed"  # ARCH_FEATURES said unaffected / not required
    SSBS = "ssbs"  # WA_2 only: no firmware help, CPU has SSBS
    NONE = "none"  # no firmware mitigation known


class Status(Enum):
    MITIGATED = "mitigated"
    UNAFFECTED = "unaffected"
    VULNERABLE = "vulnerable"

    @property
    def protected(self) -> bool:
        return self is not Status.VULNERABLE


@dataclass(frozen=True)
class BootView:
    """Everything the guest learned at boot (immutable: the guest never re-probes)."""

    psci_version: int
    smccc_version: int | None
    answers: tuple[tuple[Workaround, int], ...]
    decisions: tuple[tuple[Workaround, Decision], ...]
    calls: tuple[tuple[int, int], ...]  # (function id, first argument) in issue order

    def decision(self, wa: Workaround) -> Decision:
        return dict(self.decisions)[wa]

    @property
    def smccc_1_1(self) -> bool:
        return self.smccc_version is not None


class _Recorder:
    def __init__(self, port: HypercallPort) -> None:
        self.port = port
        self.calls: list[tuple[int, int]] = []

    def call(self, fid: int, arg: int = 0) -> int:
        self.calls.append((fid, arg))
        return self.port.hvc(fid, arg)[0]


def probe(port: HypercallPort, *, psci_0_2: bool = True, cpu_has_ssbs: bool = False) -> BootView:
    """The boot-time discovery sequence (see module docstring)."""
    rec = _Recorder(port)
    version = rec.call(P.PSCI_ID["PSCI_VERSION"]) if psci_0_2 else P.KVM_ARM_PSCI_0_1
    smccc = _discover_smccc(rec, version)
    answers: dict[Workaround, int] = {}
    if smccc is not None:
        for wa in Workaround:
            answers[wa] = rec.call(P.Smccc.ARCH_FEATURES, wa.fid)
    decisions = {wa: _decide(wa, answers.get(wa), cpu_has_ssbs) for wa in Workaround}
    return BootView(version, smccc, tuple(answers.items()), tuple(decisions.items()),
                    tuple(rec.calls))


def _discover_smccc(rec: _Recorder, version: int) -> int | None:
    if version < 0 or P.PsciVersion.major(version) < 1:
        return None
    if rec.call(P.PSCI_ID["PSCI_FEATURES"], P.Smccc.VERSION) == P.PsciRet.NOT_SUPPORTED:
        return None
    smccc = rec.call(P.Smccc.VERSION)
    return smccc if smccc >= P.ARM_SMCCC_VERSION_1_1 else None


def _decide(wa: Workaround, answer: int | None, cpu_has_ssbs: bool) -> Decision:
    if answer == P.SmcccRet.SUCCESS:
        return Decision.FIRMWARE_CALLS
    if answer in (P.SMCCC_ARCH_WORKAROUND_RET_UNAFFECTED, P.SmcccRet.NOT_REQUIRED):
        return Decision.NOT_NEEDED
    if wa is Workaround.WA2 and cpu_has_ssbs:
        return Decision.SSBS
    return Decision.NONE


def judge(decision: Decision, truth: Protection) -> Status:
    """A boot-time decision evaluated on a host that really provides ``truth``."""
    if truth is Protection.UNAFFECTED:
        return Status.UNAFFECTED
    if truth is Protection.PERMANENT:
        return Status.MITIGATED
    if truth is Protection.CALLS and decision is Decision.FIRMWARE_CALLS:
        return Status.MITIGATED
    if truth is Protection.SSBS and decision is Decision.SSBS:
        return Status.MITIGATED
    return Status.VULNERABLE


def statuses(view: BootView, truth: Mapping[Workaround, Protection]) -> dict[Workaround, Status]:
    return {wa: judge(view.decision(wa), truth[wa]) for wa in Workaround}


def lost(before: Mapping[Workaround, Status],
         after: Mapping[Workaround, Status]) -> list[Workaround]:
    """Workarounds protected before and vulnerable after (the silent-loss set)."""
    return [wa for wa in Workaround if before[wa].protected and not after[wa].protected]


class Arm64Guest:
    """The guest OS side: probes once at boot, then keeps its view across migrations."""

    def __init__(self) -> None:
        self.view: BootView | None = None
        self.boot_status: dict[Workaround, Status] = {}

    def boot(self, port: HypercallPort, truth: Mapping[Workaround, Protection], *,
             psci_0_2: bool = True, cpu_has_ssbs: bool = False) -> BootView:
        """Probe the firmware (only here) and record how protected the guest is on this host."""
        self.view = probe(port, psci_0_2=psci_0_2, cpu_has_ssbs=cpu_has_ssbs)
        self.boot_status = statuses(self.view, truth)
        return self.view

    def status_on(self, truth: Mapping[Workaround, Protection]) -> dict[Workaround, Status]:
        """Protection on a (possibly different) host, from the boot view: no re-probe."""
        if self.view is None:
            raise ModelError("guest has not booted: no boot-time firmware view")
        return statuses(self.view, truth)

    def restore(self, view: BootView, boot_status: Mapping[Workaround, Status]) -> None:
        """Adopt a migrated view (the destination side of the guest's memory)."""
        self.view = view
        self.boot_status = dict(boot_status)

    def report(self, truth: Mapping[Workaround, Protection]) -> dict[str, object]:
        """The guest part of a VM report: PSCI/SMCCC seen at boot, status per workaround."""
        if self.view is None:
            return {"booted": False}
        now = self.status_on(truth)
        return {
            "booted": True,
            "psci_version": P.PsciVersion.name(self.view.psci_version),
            "smccc_1_1": self.view.smccc_1_1,
            "mitigation": {wa.key: now[wa].value for wa in Workaround},
            "decisions": {wa.key: d.value for wa, d in self.view.decisions},
            "lost": [wa.key for wa in lost(self.boot_status, now)],
        }


# --- the guest's view travels with the guest (it lives in guest memory) -------------------------

_VIEW_MAGIC = b"PSCV"
_DECISIONS = tuple(Decision)
_STATUSES = tuple(Status)


def encode_view(view: BootView, boot_status: Mapping[Workaround, Status]) -> bytes:
    """``"PSCV" | u32 psci | u32 smccc (0 = none) | per WA: i32 answer (or -128 = not asked),
    u8 decision, u8 boot status | u16 n | n x (u32 fid, u64 arg)``, big-endian."""
    answers = dict(view.answers)
    out = [_VIEW_MAGIC, struct.pack(">II", view.psci_version & 0xFFFFFFFF,
                                    view.smccc_version or 0)]
    for wa in Workaround:
        out.append(struct.pack(">iBB", answers.get(wa, _NOT_ASKED),
                               _DECISIONS.index(view.decision(wa)),
                               _STATUSES.index(boot_status[wa])))
    out.append(struct.pack(">H", len(view.calls)))
    out += [struct.pack(">IQ", fid, arg) for fid, arg in view.calls]
    return b"".join(out)


_NOT_ASKED = -128


def decode_view(data: bytes) -> tuple[BootView, dict[Workaround, Status]]:
    """Strict inverse of :func:`encode_view`; MalformedRecord on anything else."""
    try:
        if data[:4] != _VIEW_MAGIC:
            raise MalformedRecord("bad guest view magic")
        psci, smccc = struct.unpack_from(">II", data, 4)
        pos, answers, decisions, status = 12, [], [], {}
        for wa in Workaround:
            answer, dec, st = struct.unpack_from(">iBB", data, pos)
            pos += 6
            if answer != _NOT_ASKED:
                answers.append((wa, answer))
            decisions.append((wa, _DECISIONS[dec]))
            status[wa] = _STATUSES[st]
        (n,) = struct.unpack_from(">H", data, pos)
        calls = tuple(struct.unpack_from(">IQ", data, pos + 2 + 12 * i) for i in range(n))
        if pos + 2 + 12 * n != len(data):
            raise MalformedRecord("guest view length mismatch")
    except (struct.error, IndexError) as exc:
        raise MalformedRecord(f"malformed guest view: {exc}") from exc
    view = BootView(psci, smccc or None, tuple(answers), tuple(decisions), calls)
    return view, status
