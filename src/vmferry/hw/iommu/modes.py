"""Mode switches of the probe model and the three presets of docs/models/iommu-probe.md §11.3.

A mode is a set of switches, each reproducing one historical bug.  Presets name the
designs: ``pre_6_7`` (v6.2-rc1 ... v6.6), ``global_lock`` (v6.7 ... v6.14) and ``v6_15``
(the v6.15 rework with the 6.15.1 follow-ups; the default and correct mode).  A mode is
written as a preset optionally followed by ``+switch`` terms: ``v6_15+relock_no_recheck``
(the scheme of every model, :mod:`vmferry.hw.modes`; :data:`PROBE_MODES` declares this
one).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vmferry.hw.iommu.errors import Errno, IommuError
from vmferry.hw.modes import Modes, Switch, UnknownMode

#: switch -> (faulty behaviour, hazard reproduced)
SWITCHES: dict[str, tuple[str, str]] = {
    "of_configure_unlocked": ("of_iommu_configure does not take the probe lock", "R1"),
    "probe_unlocked": ("__probe_device callers do not take the probe lock", "R0"),
    "relock_no_recheck": (
        "init_device does not re-check after re-locking and drops the lock even with a "
        "fwspec", "R2",
    ),
    "no_default_domain_gate": (
        "use_default_domain succeeds while the group has no default domain", "R3",
    ),
    "no_ready_flag": ("fwspec_init ignores the instance's ready flag", "R4"),
    "cache_fwspec_ptr": ("configure caches the fwspec pointer across of_xlate calls", "R5"),
    "leaky_of_xlate_driver": (
        "the IOMMU driver allocates per-device data in of_xlate, frees it only in "
        "release_device", "§8 leak",
    ),
    "cleanup_overreach": (
        "configure always frees dev->iommu on error, even one it did not create", "§11.3",
    ),
    "cleanup_underreach": (
        "configure only frees the fwspec on error, leaving a dev->iommu it created", "§11.3",
    ),
    "legacy_flow": (
        "no firmware parsing from the core's probe path; configure replays the probe "
        "whenever the device has no group", "pre-v6.15 flow",
    ),
}


@dataclass(frozen=True)
class ProbeMode:
    of_configure_unlocked: bool = False
    probe_unlocked: bool = False
    relock_no_recheck: bool = False
    no_default_domain_gate: bool = False
    no_ready_flag: bool = False
    cache_fwspec_ptr: bool = False
    leaky_of_xlate_driver: bool = False
    cleanup_overreach: bool = False
    cleanup_underreach: bool = False
    legacy_flow: bool = False
    name: str = "v6_15"

    @property
    def switches(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self) if f.name != "name" and getattr(self, f.name))

    @property
    def lockdep(self) -> bool:
        """v6.8+ lockdep assertions (dev_iommu_get, dev_iommu_priv_set, fwspec under L)."""
        return not self.legacy_flow

    @classmethod
    def parse(cls, text: str) -> ProbeMode:
        """``preset[+switch...]``; raises IommuError(EINVAL) for unknown names."""
        try:
            mode = PROBE_MODES.parse(text)
        except UnknownMode as exc:
            raise IommuError(Errno.EINVAL, str(exc)) from exc
        return cls.of(mode.switches, name=text)

    @classmethod
    def of(cls, switches: frozenset[str], name: str) -> ProbeMode:
        return cls(**{s: True for s in switches}, name=name)


PRESETS: dict[str, frozenset[str]] = {
    "pre_6_7": frozenset(
        {"legacy_flow", "of_configure_unlocked", "no_default_domain_gate", "no_ready_flag",
         "cleanup_underreach"}
    ),
    "global_lock": frozenset(
        {"legacy_flow", "no_default_domain_gate", "no_ready_flag", "cleanup_underreach"}
    ),
    "v6_15": frozenset(),
    # the v6.15 release itself, before the two 6.15.1 follow-up fixes
    "v6_15_release": frozenset({"relock_no_recheck", "no_ready_flag"}),
}

DEFAULT_MODE = "v6_15"
PROBE_MODES = Modes("iommu-probe", (Switch(n, b, h) for n, (b, h) in SWITCHES.items()), PRESETS,
                    DEFAULT_MODE)
V6_15 = ProbeMode()
