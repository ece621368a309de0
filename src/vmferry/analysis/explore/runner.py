"""Entry points: explore an instance factory, run a scenario, replay a saved schedule."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmferry.analysis.explore.api import Case, Instance, Scenario
from vmferry.analysis.explore.cases import (
    explore_case,
    factory_of,
    failure_of,
)
from vmferry.analysis.explore.distributed import run_cases
from vmferry.analysis.explore.engine import SearchLimits, SearchStats, run_schedule
from vmferry.analysis.explore.report import (
    AD_HOC,
    Failure,
    ReplayScriptError,
    Report,
    read_script,
    save_failure,
)
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.errors import ConfigError

#: exhaustive searches: source-DPOR with sleep sets, sleep sets (with state hashing) over
#: every enabled choice, plain enumeration; then seeded random walks
STRATEGIES = ("dpor", "sleep", "naive", "random")
DEFAULT_STRATEGY = "dpor"
#: older names still accepted
_ALIASES = {"exhaustive": "sleep"}
_REDUCTION = {"dpor": "dpor", "sleep": "sleep", "naive": "none", "random": "none"}
DEFAULT_FAILURES_DIR = Path("explore-failures")


class _Default:
    """Sentinel: use the default failures directory."""


DEFAULT = _Default()


def default_failures_dir() -> Path:
    """``$VMFERRY_EXPLORE_FAILURES`` or ./explore-failures/."""
    env = os.environ.get("VMFERRY_EXPLORE_FAILURES")
    return Path(env) if env else DEFAULT_FAILURES_DIR


def explore(
    instance_factory: Callable[[], Instance],
    *,
    name: str = AD_HOC,
    strategy: str = DEFAULT_STRATEGY,
    preemption_bound: int | None = None,
    max_depth: int | None = None,
    seed: int = 0,
    max_schedules: int | None = None,
    max_steps: int = 10_000,
    por: bool = True,
    state_hashing: bool = True,
    stop_on_failure: bool = False,
    failures_dir: Path | str | _Default | None = None,
) -> Report:
    """Explore the interleavings of ad-hoc threads built by ``instance_factory``.

    ``strategy`` is ``"dpor"`` (source-DPOR with sleep sets), ``"sleep"`` (bounded DFS
    with sleep sets and state hashing), ``"naive"`` (every bounded schedule) or
    ``"random"`` (``max_schedules`` seeded random walks, default 1000).  Raises
    ConfigError for an unknown strategy or a negative bound.
    """
    strategy = _ALIASES.get(strategy, strategy)
    limits = _limits(strategy, preemption_bound, max_depth, max_schedules, max_steps)
    limits.por, limits.state_hashing, limits.stop_on_failure = por, state_hashing, stop_on_failure
    report = Report(name, AD_HOC, strategy, preemption_bound=preemption_bound, seed=seed)
    report.cases.append(name)
    explore_case(report, name, instance_factory, limits, seed)
    _save(report, failures_dir)
    return report


def run_scenario(
    scenario: Scenario,
    mode: str | None = None,
    case: str | None = None,
    strategy: str = DEFAULT_STRATEGY,
    preemption_bound: int | None = None,
    seed: int = 0,
    max_schedules: int | None = None,
    *,
    failures_dir: Path | str | _Default | None = DEFAULT,
    stop_on_failure: bool = False,
    workers: int = 1,
    ray_address: str | None = None,
    state_hashing: bool = True,
    progress: Callable[[ExploreProgress], None] | None = None,
    split_depth: int = 0,
) -> Report:
    """Explore every case of ``scenario`` (or only ``case``) in ``mode``.

    ``progress``, if given, is called with the running totals after every schedule (in
    one process) or after every case (on Ray workers).

    ``mode`` defaults to the scenario's default (correct) mode, ``preemption_bound`` to the
    scenario's.  Failing schedules are saved as replay scripts in ``failures_dir``
    (default: :func:`default_failures_dir`; None: do not save).  ``workers`` > 1 (or a
    ``ray_address``) explores the cases as Ray tasks (see
    :mod:`vmferry.analysis.explore.distributed`); the report is the same as with one
    worker.  ``split_depth`` > 0 searches the subtree below every node at that depth on
    its own (one Ray task each with ``workers``; in turn in one process): the report is
    the same either way, though not the same as without the split.  Raises ConfigError
    for an unknown mode, case or strategy, or when Ray is needed and not installed.
    """
    strategy = _ALIASES.get(strategy, strategy)
    mode = scenario.default_mode if mode is None else mode
    if mode not in scenario.modes:
        raise ConfigError(f"scenario {scenario.name}: unknown mode {mode!r}")
    bound = scenario.preemption_bound if preemption_bound is None else preemption_bound
    limits = _limits(strategy, bound, None, max_schedules, scenario.max_steps)
    limits.stop_on_failure = stop_on_failure
    limits.state_hashing = limits.state_hashing and state_hashing
    if strategy == "dpor":
        limits.state_hashing = limits.state_hashing and scenario.dpor_state_hashing
    if split_depth < 0:
        raise ConfigError(f"split depth must be >= 0, got {split_depth}")
    limits.split_depth = split_depth if strategy != "random" else 0
    report = Report(scenario.name, mode, strategy, preemption_bound=bound, seed=seed,
                    deterministic=mode in scenario.deterministic)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    chosen_cases = _cases(scenario, case)
    if workers > 1 or ray_address is not None:
        if strategy == "random":
            raise ConfigError("random walks run in one process (drop --workers)")
        parts = run_cases(scenario.name, [c.name for c in chosen_cases], mode, limits, seed,
                          strategy, bound, workers=workers, address=ray_address)
        for part in parts:
            _merge(report, part)
            if progress is not None:
                progress(ExploreProgress(part.cases[-1] if part.cases else "",
                                         len(report.cases), len(chosen_cases),
                                         report.schedules_explored, report.pruned,
                                         report.failing_schedules))
    else:
        for i, chosen in enumerate(chosen_cases):
            report.cases.append(chosen.name)
            hook = None
            if progress is not None:
                hook = _case_progress(progress, report, chosen.name, i, len(chosen_cases))
            explore_case(report, chosen.name, factory_of(chosen, mode), limits, seed, hook)
    for i, failure in enumerate(report.failures):
        if failure.scenario == AD_HOC:
            report.failures[i] = _relabel(failure, scenario.name, mode)
    _save(report, failures_dir)
    return report


def _merge(report: Report, part: Report) -> None:
    report.cases.extend(part.cases)
    report.elapsed_s += part.elapsed_s
    report.schedules_explored += part.schedules_explored
    report.pruned += part.pruned
    report.pruned_by_state += part.pruned_by_state
    report.complete = report.complete and part.complete
    report.failing_schedules += part.failing_schedules
    report.failures.extend(part.failures)


@dataclass(frozen=True)
class ReplayResult:
    """The outcome of re-running a saved schedule."""

    scenario: str
    mode: str
    case: str
    expected_hazard: str
    #: the failure the replay produced, or None if the schedule ran clean
    failure: Failure | None

    @property
    def reproduced(self) -> bool:
        return self.failure is not None and self.failure.hazard == self.expected_hazard


def replay(
    script_or_path: str | Path,
    instance_factory: Callable[[], Instance] | None = None,
    *,
    max_steps: int | None = None,
) -> ReplayResult:
    """Re-run a saved schedule deterministically.

    Scenario scripts are resolved through the scenario registry; scripts of ad-hoc programs
    (scenario ``-``) need ``instance_factory``.  Raises ReplayScriptError for a malformed
    script, ConfigError for an unknown scenario/mode/case, and ScheduleMismatch when the
    schedule does not fit the program any more.
    """
    parsed = read_script(script_or_path)
    factory, budget = _resolve(parsed.scenario, parsed.mode, parsed.case, instance_factory)
    steps = max_steps if max_steps is not None else budget
    outcome = run_schedule(factory, parsed.schedule, steps)
    failure = None
    if outcome.error is not None:
        failure = _relabel(failure_of(parsed.case, outcome), parsed.scenario, parsed.mode)
    return ReplayResult(parsed.scenario, parsed.mode, parsed.case, parsed.hazard, failure)


# --- helpers ------------------------------------------------------------------------------


def _limits(
    strategy: str, bound: int | None, depth: int | None, cap: int | None, steps: int
) -> SearchLimits:
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    for label, value in (("preemption bound", bound), ("depth", depth), ("max_schedules", cap)):
        if value is not None and value < 0:
            raise ConfigError(f"{label} must be >= 0, got {value}")
    limits = SearchLimits(bound, depth, cap, steps, reduction=_REDUCTION[strategy])
    if strategy == "naive":
        limits.por = limits.state_hashing = False
    return limits


def _cases(scenario: Scenario, case: str | None) -> tuple[Case, ...]:
    if case is None:
        return scenario.cases
    found = tuple(c for c in scenario.cases if c.name == case)
    if not found:
        names = ", ".join(c.name for c in scenario.cases)
        raise ConfigError(f"scenario {scenario.name}: unknown case {case!r} (cases: {names})")
    return found


@dataclass(frozen=True)
class ExploreProgress:
    """Running totals of an exploration, for a progress display."""

    case: str
    #: the case being explored (1-based) and how many there are
    case_index: int
    cases: int
    schedules: int
    pruned: int
    failing: int


def _case_progress(progress: Callable[[ExploreProgress], None], report: Report, case: str,
                   index: int, cases: int) -> Callable[[SearchStats], None]:
    """The engine's per-run callback for one case, turned into running totals."""
    base = (report.schedules_explored, report.pruned, report.failing_schedules)

    def hook(stats: SearchStats) -> None:
        progress(ExploreProgress(case, index + 1, cases, base[0] + stats.schedules,
                                 base[1] + stats.pruned, base[2] + len(stats.outcomes)))

    return hook


def _relabel(failure: Failure, scenario: str, mode: str) -> Failure:
    return Failure(
        failure.case, failure.hazard, failure.message, failure.schedule,
        scenario=scenario, mode=mode, thread=failure.thread, path=failure.path,
    )


def _save(report: Report, failures_dir: Path | str | _Default | None) -> None:
    if failures_dir is None or not report.failures:
        return
    directory = default_failures_dir() if isinstance(failures_dir, _Default) else Path(failures_dir)
    for i, failure in enumerate(report.failures):
        path = save_failure(failure, directory)
        report.failures[i] = Failure(
            failure.case, failure.hazard, failure.message, failure.schedule,
            scenario=failure.scenario, mode=failure.mode, thread=failure.thread, path=str(path),
        )


def _resolve(
    scenario_name: str, mode: str, case: str,
    instance_factory: Callable[[], Instance] | None,
) -> tuple[Callable[[], Instance], int]:
    if instance_factory is not None:
        return instance_factory, 10_000
    if scenario_name == AD_HOC:
        raise ReplayScriptError("an ad-hoc script needs the instance factory it was made from")
    scenario = all_scenarios().get(scenario_name)
    if scenario is None:
        raise ConfigError(f"unknown scenario {scenario_name!r}")
    if mode not in scenario.modes:
        raise ConfigError(f"scenario {scenario_name}: unknown mode {mode!r}")
    (chosen,) = _cases(scenario, case)
    return factory_of(chosen, mode), scenario.max_steps
