"""The faulty modes of every registered explorer scenario, for tests that sweep them all."""

from __future__ import annotations

from vmferry.analysis.explore.scenarios import all_scenarios


def faulty_modes() -> list[tuple[str, str, str]]:
    """(scenario, mode, first case failing in it) for every faulty mode of every scenario."""
    out: dict[tuple[str, str], str] = {}
    for scenario in all_scenarios().values():
        for case in scenario.cases:
            for mode in sorted(case.fails_in):
                out.setdefault((scenario.name, mode), case.name)
    return sorted((s, m, c) for (s, m), c in out.items())
