"""Deterministic interleaving explorer.

Model threads run on greenlets of the scheduler core (:mod:`vmferry.sched`) and switch only
at :func:`vmferry.sync.yield_point` and blocking :func:`vmferry.sync.wait_until` /
:class:`vmferry.sync.ModelLock` calls; the searches are the core's choosers.  See
:mod:`vmferry.analysis.explore.engine` for the search (preemption bound, sleep sets, state
hashing, random walks) and :mod:`vmferry.analysis.explore.report` for replay scripts.

Public API::

    run_scenario(scenario, mode=None, case=None, strategy="dpor",
                 preemption_bound=None, seed=0, max_schedules=None) -> Report
    explore(instance_factory, *, strategy=..., preemption_bound=..., ...) -> Report
    replay(script_or_path, instance_factory=None) -> ReplayResult
"""

from __future__ import annotations

from vmferry.analysis.explore.api import Case, Instance, Scenario
from vmferry.analysis.explore.cases import DEFAULT_RANDOM_RUNS
from vmferry.analysis.explore.engine import ScheduleMismatch, Step
from vmferry.analysis.explore.report import (
    Failure,
    ParsedScript,
    ReplayScriptError,
    Report,
    parse_script,
    read_script,
)
from vmferry.analysis.explore.runner import (
    STRATEGIES,
    ReplayResult,
    default_failures_dir,
    explore,
    replay,
    run_scenario,
)

__all__ = [
    "DEFAULT_RANDOM_RUNS",
    "STRATEGIES",
    "Case",
    "Failure",
    "Instance",
    "ParsedScript",
    "ReplayResult",
    "ReplayScriptError",
    "Report",
    "Scenario",
    "ScheduleMismatch",
    "Step",
    "default_failures_dir",
    "explore",
    "parse_script",
    "read_script",
    "replay",
    "run_scenario",
]
