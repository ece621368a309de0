"""The vfio-data-stream scenario, run over every bounded schedule.

The shared explorer is not on this branch yet: the cases run under
``vmferry.testing.interleave.explore`` (greenlets, depth-first, preemption-bounded),
with the instance's check applied at the end of each schedule.
"""

from __future__ import annotations

import pytest

from vmferry.analysis.explore.api import Case
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.analysis.explore.scenarios.vfio_data_stream import SCENARIO
from vmferry.errors import HazardError
from vmferry.testing.interleave import RunResult, explore


def _verdicts(case: Case, mode: str) -> list[BaseException | None]:
    def build():  # type: ignore[no-untyped-def]
        instance = case.build(mode)

        def check(result: RunResult) -> None:
            for err in result.errors.values():
                if err is not None:
                    raise err
            instance.invariant()
            instance.check()

        return instance.threads, check

    return [v for _, v in explore(build, preemption_bound=SCENARIO.preemption_bound)]


def test_registered() -> None:
    assert all_scenarios()["vfio-data-stream"] is SCENARIO


@pytest.mark.parametrize("case", SCENARIO.cases, ids=[c.name for c in SCENARIO.cases])
def test_correct_mode_never_fails(case: Case) -> None:
    verdicts = _verdicts(case, SCENARIO.default_mode)
    assert len(verdicts) > 1 and all(v is None for v in verdicts)


@pytest.mark.parametrize("case", SCENARIO.cases, ids=[c.name for c in SCENARIO.cases])
def test_faulty_modes_fail_some_schedule(case: Case) -> None:
    for mode in case.fails_in:
        verdicts = _verdicts(case, mode)
        assert any(isinstance(v, HazardError) for v in verdicts), mode
