"""The tce-indirect scenario over every interleaving (greenlet driver, see greenlet_driver)."""

from __future__ import annotations

import pytest
from greenlet_driver import explore

from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.analysis.explore.scenarios.tce_indirect import SCENARIO
from vmferry.errors import HazardError

CASES = {c.name: c for c in SCENARIO.cases}


def test_registered() -> None:
    assert all_scenarios()["tce-indirect"] is SCENARIO


@pytest.mark.parametrize("case", sorted(CASES))
def test_correct_mode_passes_whole_space(case: str) -> None:
    c = CASES[case]
    explored, failures = explore(lambda: c.build("correct"))
    assert explored > 10
    assert failures == []


@pytest.mark.parametrize(
    ("case", "mode"),
    [(c.name, m) for c in SCENARIO.cases for m in sorted(c.fails_in)],
)
def test_faulty_mode_has_failing_schedule(case: str, mode: str) -> None:
    c = CASES[case]
    _, failures = explore(lambda: c.build(mode))
    assert failures
    assert all(isinstance(f.error, HazardError) for f in failures)
    names = {type(f.error).__name__ for f in failures}
    bit = {"MappedCountLeak"} if mode == "zero_entry_leak" else {"UnvalidatedTce", "HostCrash"}
    assert names & bit
    assert names <= {"UnvalidatedTce", "HostCrash", "MappedCountLeak"}  # + upstream's T4 leak
