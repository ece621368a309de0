"""The arm64 migration compatibility matrix, computed by running migrations on the models.

Theory of operation
-------------------
There is no rule table here.  Each cell (source profile, destination profile, guest PSCI
choice, source mitigation, destination mitigation) is one real migration of a tiny
``arch = "arm64"`` VM, driven in process through the sans-IO engine -- the same VM
construction, handler, sessions, stream codec and load that a migration between two host
daemons runs; only the sockets are left out:

=====================  ============================================  ====================
step                   function (what the daemons call)              engine side / when
=====================  ============================================  ====================
create + boot          ``create_vm(definition, HostContext(...))``,  source host, VM
                       ``vm.start()`` -> ``Arm64Handler.vm_start``   start (guest probes)
describe destination   ``create_vm`` scratch VM ->                   destination, POST
                       ``vm.capabilities()`` (JSON round trip)       /v1/incoming
pre-flight             ``SourceSession.preflight(caps)`` ->          source, before any
                       ``Arm64Handler.preflight`` -> ``decide``      RAM moves
stream                 ``SourceSession.start/next_buffers`` ->       both, RAM then the
                       ``StreamDecoder`` -> ``DestinationSession``   stopped guest's state
load                   ``DestinationSession.finish`` ->              destination, before
                       ``Arm64Handler.load_complete``                LOADED
failure                ``DestinationSession.abort``,                 destination error:
                       ``SourceSession.fail`` (source resumes)       the source resumes
resume                 ``SourceSession.complete``,                   after COMMIT
                       ``DestinationSession.resume`` -> post_load
=====================  ============================================  ====================

``qemu`` mode has no pre-flight and loads with the classic merge, so incompatibilities show
up while loading, after the source stopped (``fails_after_stop``) -- or not at all
(``degraded``).  ``preflight`` mode loads with the strict merge after the handler's
pre-flight; a load failure or an unannounced loss there is a pre-flight bug and raises
:class:`~vmferry.errors.InvariantViolation`.  The outcome is read from the handlers'
reports: the guest's mitigation status on the source before and on the destination after
(``post_load``, the daemon job's ``destination_report``).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from vmferry.clock import ManualClock
from vmferry.errors import ConfigError, InvariantViolation, MigrationRefused, VmferryError
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import WaLevel
from vmferry.hw.kvm.psci import PsciVersion
from vmferry.machine.arm64 import Arm64InitError
from vmferry.machine.arm64_compat import Verdict
from vmferry.machine.arm64_handler import Arm64Refused, arm64_handler, parse_psci
from vmferry.machine.profiles import HostProfile, list_profiles, load_profile, parse_mitigation
from vmferry.machine.vm import VM, HostContext, create_vm
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import transfer
from vmferry.migration.source import MigrationParams, SourceSession

OUTCOMES: Final = ("migrates", "refused", "fails_after_stop", "degraded")
GUEST_PSCI: Final = ("default", "0.2", "1.0")
MITIGATIONS: Final = tuple(level.label for level in WaLevel)
COMPAT_MODES: Final = ("qemu", "preflight")
SHORT: Final = {"not_avail": "U", "avail": "A", "not_required": "N"}
LINK_BYTES_PER_S: Final = 1e9
#: The VM each cell migrates: the smallest arm64 VM the engine takes.
CELL_VM: Final = {"name": "matrix-cell", "arch": "arm64", "memory_mib": 1, "vcpus": 1}


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
    """Caches per-host inputs across cells: hosts (profile + mitigation) and what a
    destination host answers to "expect this VM" (its scratch VM's capabilities)."""

    def __init__(self) -> None:
        self._profiles: dict[tuple[str, str], HostProfile] = {}
        self._hosts: dict[tuple[str, str, str], HostContext] = {}
        self._caps: dict[tuple[str, str], dict[str, Any]] = {}

    def profile(self, name: str, mitigation: str) -> HostProfile:
        key = (name, mitigation)
        if key not in self._profiles:
            base = load_profile(name)
            self._profiles[key] = base.with_mitigation(parse_mitigation(mitigation))
        return self._profiles[key]

    def host(self, role: str, name: str, mitigation: str) -> HostContext:
        key = (role, name, mitigation)
        if key not in self._hosts:
            self._hosts[key] = HostContext(
                f"{role}-{name}-{mitigation}", self.profile(name, mitigation)
            )
        return self._hosts[key]

    def capabilities(self, host: HostContext, definition: Mapping[str, Any]) -> dict[str, Any]:
        """``HostDaemon.expect_incoming``: a scratch VM built on ``host`` describes what it
        accepts; the answer crosses the control API as JSON."""
        key = (host.name, json.dumps(definition, sort_keys=True))  # names are unique here
        if key not in self._caps:
            scratch = create_vm(definition, host)
            try:
                caps = scratch.capabilities()
            finally:
                scratch.close()
            self._caps[key] = json.loads(json.dumps(caps))
        return self._caps[key]


def cell_definition(guest_psci: str) -> dict[str, Any]:
    """The VM definition a cell migrates (ConfigError for an unknown PSCI choice)."""
    if guest_psci not in GUEST_PSCI:
        raise ConfigError(f"guest PSCI {guest_psci!r} is not one of {', '.join(GUEST_PSCI)}")
    parse_psci(guest_psci)
    return {**CELL_VM, "psci": guest_psci}


def run_cell(spec: CellSpec, ctx: MatrixContext | None = None) -> Cell | None:
    """Migrate once on the models; None when the source VM cannot exist (pin impossible)."""
    ctx = ctx or MatrixContext()
    if spec.compat not in COMPAT_MODES:
        raise ConfigError(f"unknown compat mode {spec.compat!r}")
    definition = cell_definition(spec.guest_psci)
    src_host = ctx.host("source", spec.source, spec.source_mitigation)
    dst_host = ctx.host("destination", spec.destination, spec.destination_mitigation)
    vm = boot(definition, src_host)
    if vm is None:
        return None
    try:
        return _migrate(spec, vm, definition, dst_host, ctx)
    finally:
        vm.close()


def boot(definition: Mapping[str, Any], host: HostContext) -> VM | None:
    """Create and start the VM on ``host``; None when its kernel refuses the PSCI pin."""
    vm = create_vm(definition, host)
    try:
        vm.start()
    except Arm64InitError:
        vm.close()
        return None
    return vm


def _migrate(
    spec: CellSpec, vm: VM, definition: Mapping[str, Any], dst_host: HostContext, ctx: MatrixContext
) -> Cell:
    source = arm64_handler(vm)
    before = source.report()
    base = _base(spec, before)
    clock = ManualClock()
    session = SourceSession(
        vm, MigrationParams(compat=spec.compat, allow_degraded=spec.allow_degraded), clock
    )
    try:
        session.preflight(ctx.capabilities(dst_host, definition))
    except MigrationRefused as exc:
        session.fail("pre-flight", str(exc))
        return _refused(base, exc, vm)
    dst = DestinationSession(clock, factory=lambda d: create_vm(d, dst_host))
    try:
        ack = _transfer(session, dst, clock)
    except VmferryError as exc:
        return _failed(spec, base, exc, session, dst, before)
    session.complete(ack)
    post = dst.resume()
    dst.hand_over().close()
    decision = source.decision
    degraded_allowed = decision is not None and decision.verdict is Verdict.DEGRADED
    return _finish(base, spec, degraded_allowed, before, post["arm64"])


def _transfer(
    session: SourceSession, dst: DestinationSession, clock: ManualClock
) -> dict[str, Any]:
    """The stream, from the source session's buffers into the destination session, over
    a simulated link of :data:`LINK_BYTES_PER_S`."""
    transfer(session, dst, clock, link_bytes_per_s=LINK_BYTES_PER_S)
    return dst.finish(start=False)


def _refused(base: dict[str, Any], exc: MigrationRefused, vm: VM) -> Cell:
    if isinstance(exc, Arm64Refused):
        d = exc.decision
        return _cell(
            base,
            "refused",
            d.reason,
            step="pre-flight",
            register=d.register,
            value=d.value,
            lost=tuple(w.key for w in d.lost),
            source_running=vm.running,
        )
    return _cell(base, "refused", str(exc), step="pre-flight", source_running=vm.running)


def _failed(
    spec: CellSpec,
    base: dict[str, Any],
    exc: VmferryError,
    session: SourceSession,
    dst: DestinationSession,
    before: dict[str, Any],
) -> Cell:
    """The destination failed: it discards its VM and the source takes the guest back."""
    dst.abort()
    stopped = not session.vm.running
    step = str(getattr(exc, "step", "") or "load")
    session.fail(step, str(exc))
    if not stopped:
        raise InvariantViolation(f"destination failed before the source stopped: {exc}")
    if spec.compat == "preflight":
        raise InvariantViolation(f"pre-flight passed but the load failed: {exc}") from exc
    now = arm64_handler(session.vm).report()
    resumed = session.vm.running and now["guest"] == before["guest"]
    reason = f"{step}: {getattr(exc, 'reason', exc)}"
    return _cell(
        base,
        "fails_after_stop",
        reason,
        step=step,
        register=getattr(exc, "rid", None),
        value=getattr(exc, "value", None),
        source_running=resumed,
    )


def _base(spec: CellSpec, before: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "source": spec.source,
        "destination": spec.destination,
        "guest_psci": spec.guest_psci,
        "source_mitigation": spec.source_mitigation,
        "destination_mitigation": spec.destination_mitigation,
        "compat": spec.compat,
        "psci_before": before["guest"]["psci_version"],
        "guest_before": dict(before["guest"]["mitigation"]),
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
    degraded_allowed: bool,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
) -> Cell:
    gone = tuple(after["guest"]["lost"])
    psci_before = PsciVersion.parse(before["guest"]["psci_version"])
    psci_after = PsciVersion.parse(after["firmware"]["psci_version"])
    notes = list(_psci_change(psci_before, psci_after))
    notes += [
        f"DROP: trailing unknown {name} = {value} silently ignored (classic merge)"
        for name, value in after.get("load", {}).get("dropped", {}).items()
    ]
    if gone and spec.compat == "preflight" and not degraded_allowed:
        raise InvariantViolation(f"silent loss of {list(gone)} passed pre-flight")
    was, now = before["guest"]["mitigation"], after["guest"]["mitigation"]
    extra: dict[str, Any] = {
        "psci_after": PsciVersion.name(psci_after),
        "guest_after": dict(now),
        "lost": gone,
        "notes": tuple(notes),
    }
    if gone:
        what = ", ".join(f"{w} ({was[w]} -> {now[w]})" for w in gone)
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
