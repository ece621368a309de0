"""Issue 15 item 4: honest faulty modes.

For every faulty mode of every registered scenario: a race hazard has schedules that pass
and schedules that fail; a deterministic hazard (declared in ``Scenario.deterministic``)
fails on every schedule, and says so in its mode description and in the JSON report.
"""

from __future__ import annotations

import pytest
from tests.unit.analysis.faulty import faulty_modes

from vmferry.analysis.explore import run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios

FAULTY = [f for f in faulty_modes() if f[0] != "iommu-probe"]


@pytest.mark.parametrize(("scenario", "mode", "case"), FAULTY, ids=["/".join(f) for f in FAULTY])
def test_item4_race_hazards_pass_somewhere_deterministic_ones_nowhere(
    scenario: str, mode: str, case: str
) -> None:
    sc = all_scenarios()[scenario]
    report = run_scenario(sc, mode=mode, case=case, preemption_bound=1, failures_dir=None)
    assert report.complete and report.failing_schedules > 0
    deterministic = mode in sc.deterministic
    assert report.to_json()["deterministic"] is deterministic
    if deterministic:
        assert report.failing_schedules == report.schedules_explored
        assert "deterministic" in sc.mode_help[mode]
    else:
        assert report.failing_schedules < report.schedules_explored


def test_item4_declared_deterministic_modes() -> None:
    scenarios = all_scenarios()
    assert "no_pf_skip" in scenarios["lpm-update"].deterministic
    assert "stale_fd" in scenarios["vfio-data-stream"].deterministic
