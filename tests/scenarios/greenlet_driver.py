"""A tiny exhaustive interleaving driver over greenlets, for scenario threads.

Stands in for the project explorer until it lands: every model thread runs on a greenlet;
``yield_point`` and ``wait`` hand control back to the driver, which explores every
choice of the next runnable thread by depth-first search over choice prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from greenlet import greenlet

from vmferry.analysis.explore.api import Instance
from vmferry.sync import scheduled


@dataclass
class Outcome:
    schedule: list[str]
    error: BaseException | None


class _Hook:
    def __init__(self, driver: _Run) -> None:
        self.driver = driver

    def yield_point(self, label: str, obj: Hashable | None, write: bool) -> None:
        self.driver.pause(None)

    def wait(self, label: str, ready: Callable[[], bool]) -> None:
        while not ready():
            self.driver.pause(ready)

    def current_thread(self) -> str:
        return self.driver.current


class _Run:
    def __init__(
        self, instance: Instance, prefix: list[int], max_steps: int, bound: int | None
    ) -> None:
        self.bound = bound
        self.preemptions = 0
        #: per step: the choices still allowed by the preemption bound
        self.allowed: list[list[int]] = []
        self.instance = instance
        self.prefix = prefix
        self.max_steps = max_steps
        self.current = ""
        self.main = greenlet.getcurrent()
        self.blocked: dict[str, Callable[[], bool] | None] = {}
        self.errors: list[BaseException] = []
        self.branching: list[int] = []
        self.schedule: list[str] = []
        self.lets: dict[str, greenlet] = {}
        for name, fn in instance.threads.items():
            self.lets[name] = greenlet(self._wrap(fn))
            self.blocked[name] = None

    def _wrap(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by the driver
                self.errors.append(exc)

        return run

    def pause(self, ready: Callable[[], bool] | None) -> None:
        self.blocked[self.current] = ready
        self.main.switch()

    def go(self) -> Outcome:
        step = 0
        while True:
            alive = [n for n, g in self.lets.items() if not g.dead]
            runnable = [n for n in alive if (self.blocked[n] is None or self.blocked[n]())]  # type: ignore[misc]
            if not alive:
                break
            if not runnable or step > self.max_steps:
                self.errors.append(AssertionError(f"stuck: {alive} blocked"))
                break
            prev = self.schedule[-1] if self.schedule else None
            if prev in runnable:  # keep running the previous thread first: no preemption
                runnable.remove(prev)
                runnable.insert(0, prev)
            choices = list(range(len(runnable)))
            if prev in runnable and self.bound is not None and self.preemptions >= self.bound:
                choices = [0]
            self.allowed.append(choices)
            choice = self.prefix[step] if step < len(self.prefix) else 0
            if choice != 0 and prev in runnable:
                self.preemptions += 1
            self.branching.append(len(runnable))
            name = runnable[choice]
            self.schedule.append(name)
            self.current = name
            self.blocked[name] = None
            self.lets[name].switch()
            step += 1
            if self.errors:
                break
            try:
                self.instance.invariant()
            except BaseException as exc:
                self.errors.append(exc)
                break
        if not self.errors:
            try:
                self.instance.check()
            except BaseException as exc:
                self.errors.append(exc)
        return Outcome(self.schedule, self.errors[0] if self.errors else None)


def explore(
    build: Callable[[], Instance], max_steps: int = 2000, preemption_bound: int | None = None
) -> tuple[int, list[Outcome]]:
    """Run every schedule (within the preemption bound); return (explored, failures)."""
    failures: list[Outcome] = []
    stack: list[list[int]] = [[]]
    explored = 0
    while stack:
        prefix = stack.pop()
        run = _Run(build(), prefix, max_steps, preemption_bound)
        with scheduled(_Hook(run)):  # type: ignore[arg-type]
            outcome = run.go()
        explored += 1
        if outcome.error is not None:
            failures.append(outcome)
        for depth in range(len(prefix), len(run.allowed)):
            for alt in run.allowed[depth][1:]:
                stack.append([*prefix, *([0] * (depth - len(prefix))), alt])
    return explored, failures
