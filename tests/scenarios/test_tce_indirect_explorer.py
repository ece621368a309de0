"""The tce-indirect scenario under the project's interleaving explorer."""

from __future__ import annotations

import pytest

from vmferry.analysis.explore import run_scenario
from vmferry.analysis.explore.scenarios.tce_indirect import SCENARIO


def test_correct_mode_passes_the_whole_bounded_space() -> None:
    report = run_scenario(SCENARIO)
    assert report.complete and report.schedules_explored > 0
    assert report.failures == []


@pytest.mark.parametrize(
    ("case", "mode"), [(c.name, m) for c in SCENARIO.cases for m in sorted(c.fails_in)]
)
def test_faulty_modes_fail(case: str, mode: str) -> None:
    report = run_scenario(SCENARIO, mode=mode, case=case)
    assert report.failures
    hazards = {f.hazard for f in report.failures}
    assert hazards <= {"unvalidated-tce", "host-crash", "mapped-count-leak"}


def test_double_read_failure_replays() -> None:
    from vmferry.analysis.explore import replay

    report = run_scenario(SCENARIO, mode="double_read", case="t1-valid")
    result = replay(report.failures[0].script())
    assert result.reproduced and result.expected_hazard == "unvalidated-tce"
