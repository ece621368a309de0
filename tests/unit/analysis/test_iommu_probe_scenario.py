"""The iommu-probe scenario against the race/mode presence table (docs/models/iommu-probe.md
§11.3)."""

from __future__ import annotations

import pytest

from vmferry.analysis.explore import Report, replay, run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.analysis.explore.scenarios.iommu_probe import SCENARIO

#: docs/models/iommu-probe.md §11.3: race -> presets where the faulty outcome must occur
PRESENCE = {
    "R0": set(),
    "R1": {"pre_6_7"},
    "R2": set(),
    "R3": {"pre_6_7", "global_lock"},
    "R4": {"pre_6_7", "global_lock"},
    "R5": set(),
}
PRESETS = ("pre_6_7", "global_lock", "v6_15")
#: the hazard (kind, message fragment) each race's faulty outcome is; R1 has three
#: outcomes and the explorer reports whichever schedule it meets first
HAZARD: dict[str, tuple[tuple[str, str], ...]] = {
    "R0": (("invariant-violation", "invariant 2: probe_device called 2 times for D"),),
    "R1": (("invariant-violation", "D ends in S0, not S5"),
           ("null-deref", "D->iommu in dev_iommu_fwspec_set"),
           ("use-after-free", "fwspec#")),
    "R2": (("invariant-violation", "invariant 2: probe_device called 2 times for D"),),
    "R3": (("invariant-violation", "invariant 7: D"),),
    "R4": (("invariant-violation", "out-of-order probe: D's default domain"),
           ("invariant-violation", "invariant 8: off-path configure created a fwspec for D")),
    "R5": (("use-after-free", "fwspec#"),),
}


def assert_named_hazard(report: Report, race: str) -> None:
    """Every failure is one of the race's named hazards (never an unclassified crash)."""
    assert report.failures, f"{race}: no failure found"
    for failure in report.failures:
        assert failure.hazard != "exception", failure.message
        assert any(failure.hazard == kind and text in failure.message
                   for kind, text in HAZARD[race]), (race, failure.hazard, failure.message)


def test_registered_with_correct_default() -> None:
    assert all_scenarios()["iommu-probe"] is SCENARIO
    assert SCENARIO.default_mode == "v6_15"
    assert {c.name for c in SCENARIO.cases} >= set(PRESENCE)


@pytest.mark.parametrize("race", sorted(PRESENCE))
@pytest.mark.parametrize("preset", PRESETS)
def test_presence_table(race: str, preset: str) -> None:
    faulty = preset in PRESENCE[race]
    report = run_scenario(SCENARIO, mode=preset, case=race, failures_dir=None,
                          stop_on_failure=faulty)
    if faulty:
        assert_named_hazard(report, race)
    else:
        assert report.failures == []
        assert report.complete and report.schedules_explored > 0
    case = next(c for c in SCENARIO.cases if c.name == race)
    assert (preset in case.fails_in) is faulty


@pytest.mark.parametrize(
    ("mode", "case"),
    [("pre_6_7+probe_unlocked", "R0"), ("v6_15+relock_no_recheck", "R2"),
     ("v6_15+no_default_domain_gate", "R3"), ("v6_15+no_ready_flag", "R4"),
     ("v6_15+cache_fwspec_ptr", "R5"), ("v6_15_release", "R2"), ("v6_15_release", "R4")],
)
def test_switch_reproduces_its_race(mode: str, case: str) -> None:
    report = run_scenario(SCENARIO, mode=mode, case=case, failures_dir=None,
                          stop_on_failure=True)
    assert_named_hazard(report, case)


def test_failing_schedule_replays(tmp_path: object) -> None:
    report = run_scenario(SCENARIO, mode="pre_6_7", case="R1", failures_dir=str(tmp_path))
    failure = next(f for f in report.failures if f.hazard == "null-deref")
    assert failure.path is not None
    result = replay(failure.path)
    assert result.reproduced and result.failure is not None
    assert result.failure.schedule == failure.schedule
