"""arm64 VMs in a migration: ``arch = "arm64"`` and its migration handler.

Theory of operation
-------------------
Importing this module registers ``arch = "arm64"`` in :data:`vmferry.machine.vm.ARCHES`
(the :mod:`vmferry.machine` package imports it, so every VM factory knows the arch).
The setup hook builds the VM's firmware side on the host's own model -- the host's
:class:`~vmferry.machine.profiles.HostProfile` (``HostContext.profile``) -- and attaches
an :class:`Arm64Handler`; a host without an arm64 profile refuses the VM (ConfigError).

Extra definition key: ``psci = "default" | "0.2" | "1.0" | "1.1" | "1.2" | "1.3"``, the
guest's PSCI version chosen on the host it boots on (QEMU's proposed ``kvm-psci-version``,
used on the migration source).  A VM that arrives by migration takes the version from the
stream instead, so the destination never applies it.

The handler's hooks, in the engine's order:

=================  ===========================================================================
``vm_start``       first start on this host: pin ``psci`` (if any), first ``KVM_RUN``, and the
                   guest probes PSCI/SMCCC -- once; a migrated guest never probes again
``capabilities``   destination: :func:`~vmferry.machine.arm64_compat.describe_destination` on
                   this host's model (JSON), for the source's pre-flight
``preflight``      source: ``compat = "preflight"``: :func:`~vmferry.machine.arm64_compat.decide`
                   -> proceed (notes as warnings), :class:`Arm64Refused` (register, value,
                   reason), or a mitigation loss -- refused unless ``allow_degraded``, then a
                   warning.  ``compat = "qemu"``: nothing (QEMU has no pre-flight)
``save_complete``  the vCPU registers, firmware registers included, as the component record
                   (cpreg lists) behind a small envelope naming the destination's merge
``save_failed``    the source takes the guest back: a register put of its own values
                   (it and ``save_cleanup`` reset the merge: a snapshot has no pre-flight,
                   so its record asks for the strict one)
``load_complete``  destination: one-reg SETs with the merge of the envelope -- strict after
                   pre-flight, QEMU's classic merge (trailing unknown registers silently
                   dropped, docs/models/psci-firmware-registers.md §5.3) in ``qemu`` mode;
                   CpuLoadError fails the migration
                   after the source stopped, and the source resumes
``post_load``      the guest's mitigation status on the destination (the job's
                   ``destination_report``)
=================  ===========================================================================

Envelope (big-endian): ``"A64H" | u8 merge (1 classic, 2 strict) | component record``,
declared once as :data:`ENVELOPE` (:mod:`vmferry.hw.persist`).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from vmferry.errors import ConfigError, MalformedRecord, MigrationRefused, StreamDecodeError
from vmferry.guest.psci_client import encode_view
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.psci import PsciVersion
from vmferry.hw.persist import TAG4, Field, StructLayout, StructVersion
from vmferry.machine.arm64 import MergeMode, PowerTransitionError
from vmferry.machine.arm64_compat import (
    Decision,
    DestinationCaps,
    Verdict,
    decide,
    describe_destination,
    describe_source,
)
from vmferry.machine.arm64_component import Arm64Component
from vmferry.machine.handlers import ComponentData, MigrationHandler, StatePiece
from vmferry.machine.profiles import HostProfile
from vmferry.machine.schema import PSCI_CHOICES
from vmferry.machine.vm import ARCHES, ArchSupport, HostContext

if TYPE_CHECKING:
    from vmferry.machine.vm import VM

NAME: Final = "arm64"
PSCI_KEY: Final = "psci"
COMPAT_MERGE: Final = {"qemu": MergeMode.CLASSIC, "preflight": MergeMode.STRICT}



class MergeCode(enum.IntEnum):
    """The merge a destination applies, as the envelope encodes it (by these values)."""

    CLASSIC = 1
    STRICT = 2


_MERGE_CODES: Final = {MergeMode.CLASSIC: MergeCode.CLASSIC, MergeMode.STRICT: MergeCode.STRICT}
_MERGE_BY_CODE: Final = {v: k for k, v in _MERGE_CODES.items()}
#: ``"A64H" | u8 merge``, then the component's record: the handler's envelope has no version
#: field of its own (the release wrote it so), its magic names the version
ENVELOPE = StructLayout("arm64 handler", Field("magic", TAG4), (
    StructVersion(1, b"A64H", (Field("merge", "u8", MergeCode),)),), endian=">")


class Arm64Refused(MigrationRefused):
    """Pre-flight refused an arm64 migration; ``decision`` names register, value, reason."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.register = decision.register
        self.value = decision.value
        what = ""
        if decision.register is not None:
            what = f" [{R.register_name(decision.register)}"
            what += f" = {decision.value:#x}]" if decision.value is not None else "]"
        hint = " (--allow-degraded migrates anyway)" if decision.lost else ""
        super().__init__(f"arm64: {decision.reason}{what}{hint}", "pre-flight")


def parse_psci(choice: object) -> int | None:
    """The ``psci`` definition key: None for the kernel default, else the version word."""
    if choice == "default":
        return None
    if not isinstance(choice, str) or choice not in PSCI_CHOICES:
        raise ConfigError(f"psci {choice!r} is not one of {', '.join(PSCI_CHOICES)}")
    return PsciVersion.parse(choice)


class Arm64Handler(MigrationHandler):
    """The firmware side of one arm64 VM on one host (see the module docstring)."""

    name = NAME

    def __init__(self, profile: HostProfile, vcpus: int = 1, psci_pin: int | None = None) -> None:
        self.profile = profile
        self.component = Arm64Component(profile, vcpus)
        self.psci_pin = psci_pin
        self.merge = MergeMode.STRICT
        self.decision: Decision | None = None
        self.loaded = False
        self._pending: bytes | None = None

    @property
    def booted(self) -> bool:
        return self.component.guest.view is not None

    # --- both sides ------------------------------------------------------------------

    def vm_start(self) -> None:
        if self.booted:
            return
        if not self.loaded and self.psci_pin is not None:
            self.component.machine.pin_psci(self.psci_pin)
        self.component.boot()

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.component.report())
        out["psci_choice"] = ("default" if self.psci_pin is None
                              else PsciVersion.name(self.psci_pin))
        last = self.component.last_load
        if last is not None:
            out["load"] = {
                "merge": last.mode.value,
                "missing": [R.register_name(r) for r in last.missing],
                "dropped": {R.register_name(r): f"{v:#x}" for r, v in last.dropped},
                "tolerated": {R.register_name(r): f"{v:#x}" for r, v in last.tolerated},
            }
        return out

    def state_digest(self) -> str | None:
        """The guest's boot-time firmware view: equal on both sides (it never re-probes)."""
        guest = self.component.guest
        if guest.view is None:
            return None
        return hashlib.sha256(encode_view(guest.view, guest.boot_status)).hexdigest()[:32]

    # --- source ----------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        return describe_destination(self.profile).to_json()

    def preflight(self, destination: Mapping[str, Any] | None,
                  options: Mapping[str, Any]) -> list[str]:
        compat = str(options.get("compat", "preflight"))
        if compat not in COMPAT_MERGE:
            raise ConfigError(f"compat {compat!r} is not one of {sorted(COMPAT_MERGE)}")
        self.merge = COMPAT_MERGE[compat]
        if compat == "qemu":
            return []
        if destination is None:
            raise MigrationRefused("arm64: the destination did not describe its firmware "
                                   "registers (a host without an arm64 profile?)", "pre-flight")
        try:
            caps = DestinationCaps.from_json(destination)
        except StreamDecodeError as exc:
            raise MigrationRefused(f"arm64: {exc}", "pre-flight") from exc
        try:
            source = describe_source(self.component.machine, self.component.guest)
        except PowerTransitionError as exc:  # QEMU would fail the save at switchover
            raise MigrationRefused(f"arm64: {exc.reason}; try again once "
                                   "the vCPU has settled", "pre-flight") from exc
        self.decision = decide(source, caps, bool(options.get("allow_degraded", False)))
        if self.decision.verdict is Verdict.REFUSE:
            raise Arm64Refused(self.decision)
        warnings = [f"arm64: {note}" for note in self.decision.notes]
        if self.decision.verdict is Verdict.DEGRADED:
            warnings.insert(0, f"arm64: degraded migration allowed ({self.decision.loss_path})"
                               f": {self.decision.reason}")
        return warnings

    def save_complete(self) -> Sequence[StatePiece]:
        envelope = ENVELOPE.encode({"merge": _MERGE_CODES[self.merge]}, 1)
        return (ComponentData(self.name, envelope + self.component.save_state()),)

    def save_cleanup(self) -> None:
        self.merge = MergeMode.STRICT  # a later save (a snapshot) has no pre-flight

    def save_failed(self) -> None:
        self.merge = MergeMode.STRICT
        if self.component.machine.started:
            self.component.machine.put_registers()

    # --- destination -----------------------------------------------------------------

    def load(self, piece: StatePiece) -> None:
        if not isinstance(piece, ComponentData) or self._pending is not None:
            raise MalformedRecord(f"{self.name}: unexpected or repeated state")
        self._pending = bytes(piece.data)

    def load_complete(self) -> None:
        data = self._pending
        if data is None:
            raise MalformedRecord(f"{self.name}: no state arrived")
        try:
            size = ENVELOPE.size(ENVELOPE.version_of(data))
            head = ENVELOPE.decode(data[:size])
        except StreamDecodeError as exc:
            raise MalformedRecord(f"{self.name}: bad state envelope: {exc}", exc.offset) \
                from exc
        self.component.merge = _MERGE_BY_CODE[head["merge"]]
        self.component.load_state(data[size:])
        self.loaded = True

    def load_failed(self) -> None:
        self._pending = None
        if not self.component.machine.vm.destroyed:
            self.component.machine.vm.destroy()

    def post_load(self) -> dict[str, Any]:
        return self.report()


def arm64_handler(vm: VM) -> Arm64Handler:
    """The arm64 handler of ``vm``; ConfigError for a VM of another arch."""
    handler = vm.handlers.get(NAME)
    if not isinstance(handler, Arm64Handler):
        raise ConfigError(f"VM {vm.name} is not an arm64 VM")
    return handler


def setup_arm64(vm: VM, extra: Mapping[str, Any], host: HostContext) -> None:
    """``ARCHES["arm64"].setup``: the VM's firmware side on this host's profile."""
    profile = host.profile
    if not isinstance(profile, HostProfile) or profile.caps is None:
        raise ConfigError(f"host {host.name} has no arm64 profile and cannot run arm64 VM "
                          f"{vm.name} (start it with --profile)")
    pin = parse_psci(extra.get(PSCI_KEY, "default"))
    vm.add_handler(Arm64Handler(profile, len(vm.vcpus), pin))


ARCHES[NAME] = ArchSupport(NAME, extra_keys=frozenset({PSCI_KEY}), setup=setup_arm64)
