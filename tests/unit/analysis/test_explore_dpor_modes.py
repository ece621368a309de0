"""Issue 15 item 1: lock-aware DPOR (stateful where the scenario opts in: iommu-probe)
against naive enumeration on every mode of
every registered scenario: in each faulty mode it finds every failure kind naive finds
in the first case failing there, at the smallest preemption bound (1, else the
scenario's) where naive finds one; in each scenario's correct mode it finds none at
bound 1 (on ``iommu-probe``, whose five race cases cost most, in R1 and R4: the client
against the walk, and the replay against it; the benchmark runs every case at bound 2 and
fails on any failure there)."""

from __future__ import annotations

import pytest
from tests.unit.analysis.faulty import faulty_modes

from vmferry.analysis.explore import run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios

FAULTY = faulty_modes()
# switchover's correct mode is explored with dpor in tests/scenarios (every case)
CORRECT = [(s.name, s.default_mode, c.name) for s in all_scenarios().values()
           if s.name != "switchover"
           for c in s.cases if s.name != "iommu-probe" or c.name in ("R1", "R4")]


def _kinds(scenario: str, mode: str, case: str | None, strategy: str,
           bound: int | None = 1) -> set[str]:
    sc = all_scenarios()[scenario]
    report = run_scenario(sc, mode=mode, case=case, strategy=strategy,
                          preemption_bound=bound, failures_dir=None)
    assert report.complete
    return {f.hazard for f in report.failures}


@pytest.mark.parametrize(("scenario", "mode", "case"), FAULTY, ids=["/".join(f) for f in FAULTY])
def test_item1_dpor_finds_every_failure_kind_naive_finds(scenario: str, mode: str,
                                                        case: str) -> None:
    bound: int | None = 1
    naive = _kinds(scenario, mode, case, "naive", bound)
    if not naive:
        bound = all_scenarios()[scenario].preemption_bound
        naive = _kinds(scenario, mode, case, "naive", bound)
    assert naive
    assert _kinds(scenario, mode, case, "dpor", bound) == naive


@pytest.mark.parametrize(("scenario", "mode", "case"), CORRECT,
                         ids=["/".join(c) for c in CORRECT])
def test_item1_dpor_finds_nothing_in_correct_modes(scenario: str, mode: str,
                                                  case: str) -> None:
    assert _kinds(scenario, mode, case, "dpor") == set()
