"""The switchover scenario: the real channel under cuts, stalls and crashes (issue 14
item 2).  The correct rules pass the whole bounded space; each classic mistake fails with
a schedule that replays."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.analysis.explore import replay, run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.analysis.explore.scenarios.switchover import SCENARIO


def test_registered() -> None:
    assert all_scenarios()["switchover"] is SCENARIO
    assert {c.name for c in SCENARIO.cases} == {
        "clean", "cut", "stall", "crash-source", "crash-destination"}


@pytest.mark.parametrize("case", [c.name for c in SCENARIO.cases])
def test_issue14_item2_correct_mode_passes_the_whole_bounded_space(case: str) -> None:
    report = run_scenario(SCENARIO, case=case, failures_dir=None)
    assert report.complete and report.schedules_explored > 100
    assert not report.failures, report.failures[0].message


@pytest.mark.parametrize(("mode", "case", "message"), [
    ("resume_after_silent_commit", "cut", "runs on both hosts"),
    ("resume_after_silent_commit", "stall", "runs on both hosts"),
    ("resume_before_commit", "cut", "runs on both hosts"),
    ("resume_before_commit", "clean", "runs on both hosts"),
])  # fmt: skip
def test_issue14_item2_faulty_modes_fail_with_a_replayable_schedule(
    mode: str, case: str, message: str, tmp_path: Path
) -> None:
    report = run_scenario(SCENARIO, mode=mode, case=case, failures_dir=tmp_path,
                          stop_on_failure=True)  # fmt: skip
    assert report.failures
    failure = report.failures[0]
    assert failure.hazard == "invariant-violation" and message in failure.message
    assert failure.path is not None
    again = replay(failure.path)
    assert again.reproduced and again.failure is not None
    assert again.failure.message == failure.message

