"""Exploring one case: the search its strategy asks for, folded into a report.

Shared by the single-process runner and the Ray task body, so that both produce the same
partial report for the same case.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmferry.analysis.explore.api import Case, Instance
from vmferry.analysis.explore.dpor import search
from vmferry.analysis.explore.engine import (
    Outcome,
    SearchLimits,
    SearchStats,
    classify,
    describe,
    random_walks,
)
from vmferry.analysis.explore.report import Failure, Report

DEFAULT_RANDOM_RUNS = 1000
#: distinct failures kept per case (all failing schedules are still counted)
MAX_FAILURES_PER_CASE = 20


def factory_of(case: Case, mode: str) -> Callable[[], Instance]:
    return lambda: case.build(mode)


def explore_case(
    report: Report, case: str, factory: Callable[[], Instance], limits: SearchLimits, seed: int,
    progress: Callable[[SearchStats], None] | None = None,
) -> None:
    """Explore one case and add its counts and failures to ``report``; ``progress`` is
    called with the running statistics after every run."""
    started = time.perf_counter()
    if report.strategy == "random":
        runs = limits.max_schedules if limits.max_schedules is not None else DEFAULT_RANDOM_RUNS
        stats: SearchStats = random_walks(factory, limits, seed, runs, progress)
    else:
        stats = search(factory, limits, progress)
    report.elapsed_s += time.perf_counter() - started
    report.schedules_explored += stats.schedules
    report.pruned += stats.pruned
    report.pruned_by_state += stats.pruned_by_state
    report.complete = report.complete and stats.complete
    report.failing_schedules += len(stats.outcomes)
    _collect(report, case, stats.outcomes)


def _collect(report: Report, case: str, outcomes: list[Outcome]) -> None:
    best: dict[tuple[str, str, str], Failure] = {}
    for outcome in outcomes:
        failure = failure_of(case, outcome)
        kept = best.get(failure.key())
        if kept is None and len(best) >= MAX_FAILURES_PER_CASE:
            continue
        if kept is None or len(failure.schedule) < len(kept.schedule):
            best[failure.key()] = failure
    report.failures.extend(best.values())


def failure_of(case: str, outcome: Outcome) -> Failure:
    assert outcome.error is not None
    return Failure(
        case, classify(outcome.error), describe(outcome.error), outcome.schedule,
        thread=outcome.thread,
    )
