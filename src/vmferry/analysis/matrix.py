"""The arm64 migration compatibility matrix, computed by running migrations on the models.

Theory of operation
-------------------
There is no rule table here.  Each cell (source profile, destination profile, guest PSCI
choice, source mitigation, destination mitigation) runs the steps a real migration runs,
through the same functions the migration engine calls:

=====================  ===========================================  =====================
step                   function                                      engine side / when
=====================  ===========================================  =====================
create + boot          ``Arm64Machine(profile, psci_pin=...)``,      source, VM start
                       ``.start()``, ``Arm64Guest.boot(...)``
pre-flight (default)   ``describe_destination(profile)`` ->          destination, before
                       ``DestinationCaps.to_json()``                 any RAM moves
                       ``describe_source(machine, guest)``,          source, before any
                       ``decide(source, caps, allow_degraded)``      RAM moves
save (source stopped)  ``encode_state(machine.save())``              source, stop-and-copy
load                   ``Arm64Machine(profile).load(                  destination, device
                       decode_state(data), MergeMode)``              state load
start                  ``.start()`` and the guest's report           destination
=====================  ===========================================  =====================

``qemu`` mode skips pre-flight and loads with the classic merge, so incompatibilities show
up while loading, after the source stopped (``fails_after_stop``) -- or not at all
(``degraded``).  ``preflight`` mode loads with the strict merge after :func:`decide`; a
load failure or an unannounced loss there is a pre-flight bug and raises
:class:`~vmferry.errors.InvariantViolation`.
"""

from __future__ import annotations

import html
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from vmferry.errors import ConfigError, InvariantViolation
from vmferry.guest.psci_client import Arm64Guest, Status, lost
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import WaLevel, Workaround
from vmferry.hw.kvm.psci import PsciVersion
from vmferry.machine.arm64 import (
    Arm64InitError,
    Arm64Machine,
    CpuLoadError,
    LoadReport,
    MergeMode,
    decode_state,
    encode_state,
)
from vmferry.machine.profiles import HostProfile, list_profiles, load_profile, parse_mitigation
from vmferry.migration.compat import (
    DestinationCaps,
    Verdict,
    decide,
    describe_destination,
    describe_source,
)

OUTCOMES: Final = ("migrates", "refused", "fails_after_stop", "degraded")
GUEST_PSCI: Final = ("default", "0.2", "1.0")
MITIGATIONS: Final = tuple(level.label for level in WaLevel)
COMPAT_MODES: Final = ("qemu", "preflight")
SHORT: Final = {"not_avail": "U", "avail": "A", "not_required": "N"}


@dataclass(frozen=True)
class CellSpec:
    source: str
    destination: str
    guest_psci: str
    source_mitigation: str
    destination_mitigation: str
    compat: str = "preflight"
    allow_degraded: bool = False


@dataclass(frozen=True)
class Cell:
    """One computed outcome.  ``reason`` names the register, the step, the PSCI change."""

    source: str
    destination: str
    guest_psci: str
    source_mitigation: str
    destination_mitigation: str
    compat: str
    outcome: str
    reason: str
    step: str = ""
    register: str | None = None
    value: str | None = None
    psci_before: str | None = None
    psci_after: str | None = None
    lost: tuple[str, ...] = ()
    source_running: bool = False  # refused / fails_after_stop: the source (re)runs the guest
    guest_before: dict[str, str] = field(default_factory=dict)
    guest_after: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lost"] = list(self.lost)
        data["notes"] = list(self.notes)
        return data


class MatrixContext:
    """Caches pure, per-host inputs (profiles and destination descriptions) across cells."""

    def __init__(self) -> None:
        self._profiles: dict[tuple[str, str], HostProfile] = {}
        self._caps: dict[tuple[str, str], DestinationCaps] = {}

    def profile(self, name: str, mitigation: str) -> HostProfile:
        key = (name, mitigation)
        if key not in self._profiles:
            base = load_profile(name)
            self._profiles[key] = base.with_mitigation(parse_mitigation(mitigation))
        return self._profiles[key]

    def destination_caps(self, name: str, mitigation: str) -> DestinationCaps:
        key = (name, mitigation)
        if key not in self._caps:
            self._caps[key] = describe_destination(self.profile(name, mitigation))
        return self._caps[key]


def _pin(guest_psci: str) -> int | None:
    if guest_psci == "default":
        return None
    try:
        return PsciVersion.parse(guest_psci)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _labels(statuses: dict[Workaround, Status]) -> dict[str, str]:
    return {wa.key: s.value for wa, s in statuses.items()}


def run_cell(spec: CellSpec, ctx: MatrixContext | None = None) -> Cell | None:
    """Migrate once on the models; None when the source VM cannot exist (pin impossible)."""
    ctx = ctx or MatrixContext()
    if spec.compat not in COMPAT_MODES:
        raise ConfigError(f"unknown compat mode {spec.compat!r}")
    src_profile = ctx.profile(spec.source, spec.source_mitigation)
    try:
        src = Arm64Machine(src_profile, psci_pin=_pin(spec.guest_psci))
    except Arm64InitError:
        return None
    src.start()
    guest = Arm64Guest()
    view = guest.boot(src.port(0), src.protection(), cpu_has_ssbs=src.vm.host.ssbs_everywhere)
    before = guest.status_on(src.protection())
    base = _base(spec, view.psci_version, before)
    verdict = None
    if spec.compat == "preflight":
        caps = ctx.destination_caps(spec.destination, spec.destination_mitigation)
        decision = decide(describe_source(src, guest), caps, spec.allow_degraded)
        if decision.verdict is Verdict.REFUSE:
            return _cell(
                base,
                "refused",
                decision.reason,
                step="pre-flight",
                register=decision.register,
                value=decision.value,
                lost=tuple(w.key for w in decision.lost),
                source_running=not src.vm.destroyed,
            )
        verdict = decision.verdict
    data = encode_state(src.save())  # the source has stopped the guest from here on
    dst = Arm64Machine(ctx.profile(spec.destination, spec.destination_mitigation))
    mode = MergeMode.CLASSIC if spec.compat == "qemu" else MergeMode.STRICT
    try:
        report = dst.load(decode_state(data), mode)
    except CpuLoadError as exc:
        if verdict is not None:
            raise InvariantViolation(f"pre-flight passed but the load failed: {exc}") from exc
        src.put_registers()  # the source resumes the guest with its own, unchanged state
        resumed = guest.status_on(src.protection()) == before
        return _cell(
            base,
            "fails_after_stop",
            f"{exc.step}: {exc.reason}",
            step=exc.step,
            register=exc.rid,
            value=exc.value,
            source_running=resumed,
        )
    dst.start()
    after = guest.status_on(dst.protection())
    return _finish(base, spec, verdict, report, before, after, dst, view.psci_version)


def _base(spec: CellSpec, psci_before: int, before: dict[Workaround, Status]) -> dict[str, Any]:
    return {
        "source": spec.source,
        "destination": spec.destination,
        "guest_psci": spec.guest_psci,
        "source_mitigation": spec.source_mitigation,
        "destination_mitigation": spec.destination_mitigation,
        "compat": spec.compat,
        "psci_before": PsciVersion.name(psci_before),
        "guest_before": _labels(before),
    }


def _cell(
    base: dict[str, Any],
    outcome: str,
    reason: str,
    *,
    step: str = "",
    register: int | None = None,
    value: int | None = None,
    **extra: Any,
) -> Cell:
    return Cell(
        **base,
        outcome=outcome,
        reason=reason,
        step=step,
        register=None if register is None else R.register_name(register),
        value=None if value is None else f"{value:#x}",
        **extra,
    )


def _finish(
    base: dict[str, Any],
    spec: CellSpec,
    verdict: Verdict | None,
    report: LoadReport,
    before: dict[Workaround, Status],
    after: dict[Workaround, Status],
    dst: Arm64Machine,
    psci_before: int,
) -> Cell:
    gone = lost(before, after)
    psci_after = dst.psci_version()
    notes = list(_psci_change(psci_before, psci_after))
    notes += [
        f"DROP: trailing unknown {R.register_name(r)} = {v:#x} silently ignored (classic merge)"
        for r, v in report.dropped
    ]
    if gone and spec.compat == "preflight" and verdict is not Verdict.DEGRADED:
        raise InvariantViolation(f"silent loss of {[w.key for w in gone]} passed pre-flight")
    extra: dict[str, Any] = {
        "psci_after": PsciVersion.name(psci_after),
        "guest_after": _labels(after),
        "lost": tuple(w.key for w in gone),
        "notes": tuple(notes),
    }
    if gone:
        what = ", ".join(f"{w.key} ({before[w].value} -> {after[w].value})" for w in gone)
        reason = "; ".join([f"guest silently loses {what}", *notes])
        return _cell(base, "degraded", reason, step="after start", **extra)
    return _cell(base, "migrates", "; ".join(notes) or "no change visible to the guest", **extra)


def _psci_change(before: int, after: int) -> Iterator[str]:
    if after > before:
        yield (
            f"PSCI silently upgraded {PsciVersion.name(before)} -> "
            f"{PsciVersion.name(after)} (harmless superset)"
        )
    elif after < before:
        yield f"PSCI downgraded {PsciVersion.name(before)} -> {PsciVersion.name(after)}"


# --- whole matrix -----------------------------------------------------------------------------


def specs(
    profiles: Sequence[str] | None = None,
    guest_psci: Sequence[str] = GUEST_PSCI,
    mitigations: Sequence[str] = MITIGATIONS,
    compat: str = "preflight",
    allow_degraded: bool = False,
) -> Iterator[CellSpec]:
    names = list(profiles) if profiles else list_profiles()
    for src, dst, psci, sm, dm in itertools.product(
        names, names, guest_psci, mitigations, mitigations
    ):
        yield CellSpec(src, dst, psci, sm, dm, compat, allow_degraded)


def run_matrix(cell_specs: Iterable[CellSpec]) -> list[Cell]:
    """Every applicable cell (cells whose source VM cannot exist are left out)."""
    ctx = MatrixContext()
    cells = [run_cell(spec, ctx) for spec in cell_specs]
    return [c for c in cells if c is not None]


def summary(cells: Sequence[Cell]) -> dict[str, int]:
    counts = Counter(c.outcome for c in cells)
    return {o: counts.get(o, 0) for o in OUTCOMES}


# --- rendering --------------------------------------------------------------------------------


def _grouped(cells: Sequence[Cell]) -> list[tuple[Cell, str]]:
    """Rows: cells with the same (source, destination, PSCI, outcome, reason) merged."""
    groups: dict[tuple[str, ...], list[Cell]] = {}
    for c in cells:
        key = (c.source, c.destination, c.guest_psci, c.outcome, c.reason)
        groups.setdefault(key, []).append(c)
    rows = []
    for members in groups.values():
        pairs = [
            f"{SHORT.get(c.source_mitigation, c.source_mitigation)}->"
            f"{SHORT.get(c.destination_mitigation, c.destination_mitigation)}"
            for c in members
        ]
        rows.append(
            (members[0], "any" if len(pairs) == len(MITIGATIONS) ** 2 else ", ".join(pairs))
        )
    return rows


def to_markdown(cells: Sequence[Cell]) -> str:
    compat = sorted({c.compat for c in cells})
    lines = [
        f"# arm64 migration matrix (compat: {', '.join(compat)})",
        "",
        "Mitigation per host: U = not_avail, A = avail, N = not_required.",
        "",
        "| Outcome | Cells |",
        "|---|---|",
    ]
    lines += [f"| {o} | {n} |" for o, n in summary(cells).items()]
    lines += [
        "",
        "| Source | Destination | Guest PSCI | Src mitig. -> Dst mitig. | Outcome | Why |",
        "|---|---|---|---|---|---|",
    ]
    for c, pairs in _grouped(cells):
        reason = c.reason.replace("|", "\\|")
        lines.append(
            f"| {c.source} | {c.destination} | {c.guest_psci} | {pairs} | "
            f"**{c.outcome}** | {reason} |"
        )
    return "\n".join(lines) + "\n"


def to_html(cells: Sequence[Cell]) -> str:
    head = (
        "<tr><th>Source</th><th>Destination</th><th>Guest PSCI</th>"
        "<th>Src mitig. -&gt; Dst mitig.</th><th>Outcome</th><th>Why</th></tr>"
    )
    rows = [
        "<tr>"
        + "".join(
            f"<td>{html.escape(x)}</td>"
            for x in (c.source, c.destination, c.guest_psci, pairs, c.outcome, c.reason)
        )
        + "</tr>"
        for c, pairs in _grouped(cells)
    ]
    counts = "".join(f"<li>{o}: {n}</li>" for o, n in summary(cells).items())
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>arm64 migration matrix"
        "</title></head><body><h1>arm64 migration matrix</h1><ul>"
        + counts
        + "</ul><table>"
        + head
        + "".join(rows)
        + "</table></body></html>\n"
    )
