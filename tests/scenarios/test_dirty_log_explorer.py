"""The dirty-log scenario under the interleaving explorer (issue 10, item 1)."""

from __future__ import annotations

import pytest

from vmferry.analysis.explore import replay, run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.analysis.explore.scenarios.dirty_log import SCENARIO


def test_registered() -> None:
    assert all_scenarios()["dirty-log"] is SCENARIO


def test_issue10_1_lost_dirty_page_correct_mode_passes_the_whole_bounded_space() -> None:
    whole = run_scenario(SCENARIO, strategy="naive", failures_dir=None)
    assert whole.complete and whole.schedules_explored > 100
    assert whole.failures == []
    # lock-aware dpor (the default) orders the critical sections only by their data
    report = run_scenario(SCENARIO, failures_dir=None)
    assert report.complete and 0 < report.schedules_explored < whole.schedules_explored
    assert report.failures == []


@pytest.mark.parametrize("case", [c.name for c in SCENARIO.cases])
def test_issue10_1_lost_dirty_page_copy_then_clear_loses_a_mark(case: str) -> None:
    report = run_scenario(SCENARIO, mode="copy_then_clear", case=case)
    assert report.complete and report.failures
    assert {f.hazard for f in report.failures} == {"lost-dirty-page"}


def test_issue10_1_lost_dirty_page_schedule_replays() -> None:
    report = run_scenario(SCENARIO, mode="copy_then_clear", case="one-write")
    result = replay(report.failures[0].script())
    assert result.reproduced and result.expected_hazard == "lost-dirty-page"
