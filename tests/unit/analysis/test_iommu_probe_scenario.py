"""The iommu-probe scenario against the spec's race/mode presence table (§11.3)."""

from __future__ import annotations

import pytest

from vmferry.analysis.explore import replay, run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.analysis.explore.scenarios.iommu_probe import SCENARIO

#: spec §11.3: race -> presets where the faulty outcome must occur
PRESENCE = {
    "R0": set(),
    "R1": {"pre_6_7"},
    "R2": set(),
    "R3": {"pre_6_7", "global_lock"},
    "R4": {"pre_6_7", "global_lock"},
    "R5": set(),
}
PRESETS = ("pre_6_7", "global_lock", "v6_15")


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
    assert bool(report.failures) is faulty
    if not faulty:
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
    assert report.failures


def test_failing_schedule_replays(tmp_path: object) -> None:
    report = run_scenario(SCENARIO, mode="pre_6_7", case="R1", failures_dir=str(tmp_path))
    failure = next(f for f in report.failures if f.hazard == "null-deref")
    assert failure.path is not None
    result = replay(failure.path)
    assert result.reproduced and result.failure is not None
    assert result.failure.schedule == failure.schedule
