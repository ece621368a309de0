"""Small deterministic interleavings of model threads, for tests, on the scheduler core.

Each model thread runs on its own greenlet under :class:`vmferry.sched.Scheduler` and
gives control back at every ``yield_point``; the next thread comes from a *choice
function* of the runnable names.  :func:`explore` enumerates every schedule of a small
instance depth-first (each run replays a prefix of choices, then takes the first
option), so a test can assert "no failure in the whole space" or "some schedule fails".
When every unfinished thread waits on a condition that is false, the run ends with
:class:`~vmferry.errors.Deadlock` reported for the blocked threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import Deadlock
from vmferry.sched import Chooser as CoreChooser
from vmferry.sched import ModelThread, Scripted
from vmferry.sched import Scheduler as Core

Chooser = Callable[[list[str]], str]


@dataclass
class RunResult:
    #: thread name -> exception it ended with (None: returned normally)
    errors: dict[str, BaseException | None] = field(default_factory=dict)
    #: the thread chosen at each scheduling step, with the options it had
    schedule: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(e is not None for e in self.errors.values())


class _Function:
    """A choice function as a core chooser."""

    def __init__(self, fn: Chooser) -> None:
        self.fn = fn

    def choose(self, sched: Core[Any], depth: int, enabled: list[str]) -> str | None:
        return self.fn(enabled)


class _Recording:
    """A core chooser that records each choice with the options it had."""

    def __init__(self, chooser: CoreChooser[Core[Any]], result: RunResult) -> None:
        self.chooser = chooser
        self.result = result

    def choose(self, sched: Core[Any], depth: int, enabled: list[str]) -> str | None:
        name = self.chooser.choose(sched, depth, enabled)
        if name is not None:
            self.result.schedule.append((name, tuple(enabled)))
        return name


def run(threads: Mapping[str, Callable[[], None]],
        choose: Chooser | CoreChooser[Core[Any]], max_steps: int = 10_000) -> RunResult:
    """Run ``threads`` to the end (or ``max_steps`` steps); ``choose`` (a function of the
    runnable names, or a :mod:`vmferry.sched` chooser) picks each step.

    Every thread's exception is recorded, not raised; threads that did not end are
    reported as Deadlock.
    """
    result = RunResult()
    core: Core[ModelThread] = Core(threads, max_steps=max_steps, stop_on_error=False)
    try:
        chooser = _Function(choose) if callable(choose) else choose
        core.run(_Recording(chooser, result))
    finally:
        core.teardown()
    stuck = set(core.stuck())
    for name, thread in core.threads.items():
        if name in stuck:
            result.errors[name] = Deadlock(f"{name} blocked forever")
        else:
            result.errors[name] = thread.error
    return result


def run_in_order(threads: Mapping[str, Callable[[], None]], order: list[str]) -> RunResult:
    """Run with a fixed preference list: at each step the first runnable name of
    ``order`` (consumed as it is used; afterwards the first runnable thread)."""
    return run(threads, Scripted(order))


def explore(
    build: Callable[[], tuple[Mapping[str, Callable[[], None]], Callable[[RunResult], None]]],
    max_schedules: int = 5_000,
    preemption_bound: int | None = 2,
) -> Iterator[tuple[RunResult, BaseException | None]]:
    """Every schedule of the instance ``build()`` makes, depth-first.

    ``build`` returns the threads and a check called with the run's result; each yielded
    item is (result, exception raised by the check or None).  With ``preemption_bound``
    only schedules that switch away from a still-runnable thread at most that many times
    are explored (the first option is always "keep running the same thread").
    """
    prefix: list[int] = []
    for _ in range(max_schedules):
        threads, check = build()
        trail: list[tuple[int, int]] = []  # (chosen index, number of options)
        last: list[str] = []
        budget = [preemption_bound]

        def choose(
            options: list[str],
            trail: list[tuple[int, int]] = trail,
            prefix: list[int] = prefix,
            last: list[str] = last,
            budget: list[int | None] = budget,
        ) -> str:
            if last and last[0] in options:
                options = [last[0]] + [o for o in options if o != last[0]]
                if budget[0] is not None and budget[0] <= 0:
                    options = options[:1]
            i = prefix[len(trail)] if len(trail) < len(prefix) else 0
            trail.append((i, len(options)))
            if i > 0 and last and last[0] == options[0] and budget[0] is not None:
                budget[0] -= 1
            last[:] = [options[i]]
            return options[i]

        result = run(threads, choose)
        try:
            check(result)
            yield result, None
        except BaseException as exc:  # the check's verdict is data here
            yield result, exc
        while trail and trail[-1][0] + 1 >= trail[-1][1]:
            trail.pop()
        if not trail:
            return
        prefix = [i for i, _ in trail[:-1]] + [trail[-1][0] + 1]
