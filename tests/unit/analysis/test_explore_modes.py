"""Issue 15 item 4: honest faulty modes.

For every faulty mode of every registered scenario: a race hazard has schedules that pass
and schedules that fail; a deterministic hazard (declared in ``Scenario.deterministic``)
fails on every schedule, and says so in its mode description and in the JSON report.
"""

from __future__ import annotations

import pytest

from vmferry.analysis.explore import run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios


def _faulty() -> list[tuple[str, str, str]]:
    out: dict[tuple[str, str], str] = {}
    for scenario in all_scenarios().values():
        for case in scenario.cases:
            for mode in sorted(case.fails_in):
                out.setdefault((scenario.name, mode), case.name)
    return sorted((s, m, c) for (s, m), c in out.items())


FAULTY = [f for f in _faulty() if f[0] != "iommu-probe"]


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
