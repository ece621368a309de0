"""The lpm-update scenario under the explorer: the seed bug found, the fix exhaustive."""

from __future__ import annotations

import pytest

from vmferry.analysis.explore import run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios

SCENARIO = all_scenarios()["lpm-update"]


@pytest.mark.parametrize("mode", ["correct", "upstream", "merge_readd"])
def test_safe_modes_pass_the_whole_bounded_space(mode: str) -> None:
    report = run_scenario(SCENARIO, mode=mode, preemption_bound=1, failures_dir=None)
    assert report.complete
    assert report.schedules_explored > 100
    assert not report.failures, report.failures[0].message


def test_correct_mode_two_preemptions_devspec() -> None:
    report = run_scenario(SCENARIO, mode="correct", case="devspec-dynamic",
                          preemption_bound=2, failures_dir=None)
    assert report.complete and not report.failures


@pytest.mark.parametrize("case", ["devspec-boot", "devspec-dynamic"])
def test_no_pf_skip_fails_with_use_after_free(case: str) -> None:
    report = run_scenario(SCENARIO, mode="no_pf_skip", case=case, preemption_bound=1,
                          failures_dir=None)
    uaf = [f for f in report.failures if f.hazard == "use-after-free"]
    assert uaf, [f.hazard for f in report.failures]
    assert "ibm,platform-facilities" in uaf[0].message
    assert "user:devspec" in uaf[0].message
    assert uaf[0].schedule
