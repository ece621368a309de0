"""The lpm-update scenario under a hand-rolled greenlet scheduler (one preemption).

The explorer engine is not on this branch yet; these tests drive the scenario's threads
through every single-preemption schedule in both thread orders.
"""

from __future__ import annotations

import pytest

from greenlet_driver import single_preemption_schedules
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.errors import UseAfterFree

SCENARIO = all_scenarios()["lpm-update"]


def _explore(case_name: str, mode: str) -> list[tuple[list[str], BaseException | None]]:
    case = next(c for c in SCENARIO.cases if c.name == case_name)
    names = list(case.build(mode).threads)
    results = []
    for a, b in ((names[0], names[1]), (names[1], names[0])):
        results += single_preemption_schedules(lambda: case.build(mode), a, b)
    return results


@pytest.mark.parametrize(("case", "mode"), [
    ("devspec-boot", "correct"), ("devspec-dynamic", "correct"), ("nx-driver", "correct"),
    ("devspec-dynamic", "upstream"), ("devspec-dynamic", "merge_readd")])
def test_safe_modes_pass_every_schedule(case: str, mode: str) -> None:
    results = _explore(case, mode)
    assert len(results) > 10
    failures = [(t, e) for t, e in results if e is not None]
    assert not failures, failures[0]


@pytest.mark.parametrize("case", ["devspec-boot", "devspec-dynamic"])
def test_no_pf_skip_has_a_use_after_free_schedule(case: str) -> None:
    results = _explore(case, "no_pf_skip")
    uafs = [(t, e) for t, e in results if isinstance(e, UseAfterFree)]
    assert uafs, "no schedule produced the use-after-free"
    _trace, err = uafs[0]
    assert "ibm,platform-facilities" in str(err)
    # and some schedule (reader done before the update) does not hit it
    assert any(not isinstance(e, UseAfterFree) for _, e in results)
