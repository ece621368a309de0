"""Exhaustive interleaving of scenario threads on the scheduler core, for scenario tests.

Every model thread runs on a greenlet of :class:`vmferry.sched.Scheduler`; the chooser
here explores every choice of the next runnable thread by depth-first search over choice
prefixes (the thread that ran last is always the first option, so a preemption bound can
cap the other ones).  The instance's ``invariant`` runs after every step and its
``check`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmferry.analysis.explore.api import Instance
from vmferry.sched import ModelThread, Scheduler, Stop


@dataclass
class Outcome:
    schedule: list[str]
    error: BaseException | None


class _Prefix:
    """Follows a prefix of choice indices, then takes the first option."""

    def __init__(self, prefix: list[int], bound: int | None) -> None:
        self.prefix = prefix
        self.bound = bound
        self.preemptions = 0
        #: per step: the choices still allowed by the preemption bound
        self.allowed: list[list[int]] = []
        self.schedule: list[str] = []

    def choose(self, sched: Scheduler[Any], depth: int, enabled: list[str]) -> str | None:
        runnable = list(enabled)
        prev = self.schedule[-1] if self.schedule else None
        if prev in runnable:  # keep running the previous thread first: no preemption
            runnable.remove(prev)
            runnable.insert(0, prev)
        choices = list(range(len(runnable)))
        if prev in runnable and self.bound is not None and self.preemptions >= self.bound:
            choices = [0]
        self.allowed.append(choices)
        choice = self.prefix[depth] if depth < len(self.prefix) else 0
        if choice != 0 and prev in runnable:
            self.preemptions += 1
        self.schedule.append(runnable[choice])
        return runnable[choice]


class _Run(Scheduler[ModelThread]):
    def __init__(self, instance: Instance, max_steps: int) -> None:
        super().__init__(instance.threads, max_steps=max_steps)
        self.instance = instance
        self.errors: list[BaseException] = []

    def advance(self, depth: int, name: str) -> bool:
        if super().advance(depth, name):
            return True
        try:
            self.instance.invariant()
        except BaseException as exc:
            self.errors.append(exc)
            return True
        return False

    def go(self, chooser: _Prefix) -> Outcome:
        try:
            stop = self.run(chooser)
        finally:
            self.teardown()
        errors = [t.error for t in self.threads.values() if t.error is not None]
        errors += self.errors
        if not errors and (stop is Stop.BUDGET or not self.finished()):
            errors.append(AssertionError(f"stuck: {self.stuck()} blocked"))
        if not errors:
            try:
                self.instance.check()
            except BaseException as exc:
                errors.append(exc)
        return Outcome(chooser.schedule, errors[0] if errors else None)


def explore(
    build: Any, max_steps: int = 2000, preemption_bound: int | None = None
) -> tuple[int, list[Outcome]]:
    """Run every schedule (within the preemption bound); return (explored, failures)."""
    failures: list[Outcome] = []
    stack: list[list[int]] = [[]]
    explored = 0
    while stack:
        prefix = stack.pop()
        chooser = _Prefix(prefix, preemption_bound)
        outcome = _Run(build(), max_steps).go(chooser)
        explored += 1
        if outcome.error is not None:
            failures.append(outcome)
        for depth in range(len(prefix), len(chooser.allowed)):
            for alt in chooser.allowed[depth][1:]:
                stack.append([*prefix, *([0] * (depth - len(prefix))), alt])
    return explored, failures
