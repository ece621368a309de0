"""Issue 15 item 1: lock-aware, stateful DPOR against naive enumeration on every mode of
every registered scenario (preemption bound 1, to stay fast): in each faulty mode it
finds every failure kind naive finds in the first case failing there; in each scenario's
correct mode it finds none."""

from __future__ import annotations

import pytest
from tests.unit.analysis.faulty import faulty_modes

from vmferry.analysis.explore import run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios

FAULTY = faulty_modes()
CORRECT = [(s.name, s.default_mode) for s in all_scenarios().values()]


def _kinds(scenario: str, mode: str, case: str | None, strategy: str) -> set[str]:
    report = run_scenario(all_scenarios()[scenario], mode=mode, case=case, strategy=strategy,
                          preemption_bound=1, failures_dir=None)
    assert report.complete
    return {f.hazard for f in report.failures}


@pytest.mark.parametrize(("scenario", "mode", "case"), FAULTY, ids=["/".join(f) for f in FAULTY])
def test_item1_dpor_finds_every_failure_kind_naive_finds(scenario: str, mode: str,
                                                        case: str) -> None:
    naive = _kinds(scenario, mode, case, "naive")
    assert naive
    assert _kinds(scenario, mode, case, "dpor") == naive


@pytest.mark.parametrize(("scenario", "mode"), CORRECT, ids=["/".join(c) for c in CORRECT])
def test_item1_dpor_finds_nothing_in_correct_modes(scenario: str, mode: str) -> None:
    assert _kinds(scenario, mode, None, "dpor") == set()
