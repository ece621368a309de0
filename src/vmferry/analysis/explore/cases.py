"""Exploring one case: the search its strategy asks for, folded into a report.

Shared by the single-process runner and the Ray task body, so that both produce the same
partial report for the same case.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmferry.analysis.explore.api import Case, Instance
from vmferry.analysis.explore.dpor import merge_stats, search, split
from vmferry.analysis.explore.engine import (
    Node,
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
    elif limits.split_depth:
        stats = _subtrees(factory, limits, progress)
    else:
        stats = search(factory, limits, progress)
    fold(report, case, Part.of(case, stats), time.perf_counter() - started)


@dataclass
class Part:
    """What a search (or a subtree's) adds to a case's report; picklable (Ray)."""

    schedules: int = 0
    pruned: int = 0
    pruned_by_state: int = 0
    complete: bool = True
    #: every failing schedule, in the order the search met them
    failures: list[Failure] = field(default_factory=list)

    @classmethod
    def of(cls, case: str, stats: SearchStats) -> Part:
        return cls(stats.schedules, stats.pruned, stats.pruned_by_state, stats.complete,
                   [failure_of(case, o) for o in stats.outcomes])

    def add(self, other: Part) -> None:
        self.schedules += other.schedules
        self.pruned += other.pruned
        self.pruned_by_state += other.pruned_by_state
        self.complete = self.complete and other.complete
        self.failures.extend(other.failures)


def fold(report: Report, case: str, part: Part, elapsed: float) -> None:
    """Add one case's search to ``report`` (its failures: the shortest of each kind)."""
    report.elapsed_s += elapsed
    report.schedules_explored += part.schedules
    report.pruned += part.pruned
    report.pruned_by_state += part.pruned_by_state
    report.complete = report.complete and part.complete
    report.failing_schedules += len(part.failures)
    _collect(report, part.failures)


def _subtrees(factory: Callable[[], Instance], limits: SearchLimits,
              progress: Callable[[SearchStats], None] | None) -> SearchStats:
    """The search split at ``limits.split_depth``, its subtrees searched in turn."""
    subtrees, total = split(factory, limits, limits.split_depth)
    for nodes in subtrees:
        hook = None
        if progress is not None:
            def hook(part: SearchStats, done: SearchStats = total) -> None:
                progress(merge_stats([done, part]))
        merge_stats([search(factory, limits, hook, prefix=nodes)], total)
    return total


def subtree_part(case: str, factory: Callable[[], Instance], limits: SearchLimits,
                 nodes: list[Node]) -> Part:
    """One subtree of a split search (a Ray task body)."""
    return Part.of(case, search(factory, limits, prefix=nodes))


def _collect(report: Report, failures: list[Failure]) -> None:
    best: dict[tuple[str, str, str], Failure] = {}
    for failure in failures:
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
