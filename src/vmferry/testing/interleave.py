"""A small deterministic scheduler for model threads (greenlets), for tests.

It installs a :class:`vmferry.sync.SchedulerHook`: each model thread runs on its own
greenlet and gives control back at every ``yield_point``; the scheduler then picks the
next thread from a *choice function*.  :func:`explore` enumerates every schedule of a
small instance depth-first (each run replays a prefix of choices, then takes the first
option), so a test can assert "no failure in the whole space" or "some schedule fails".
When every unfinished thread waits on a condition that is false, the run ends with
:class:`~vmferry.errors.Deadlock` reported for the blocked threads.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field

from greenlet import greenlet

from vmferry.errors import Deadlock
from vmferry.sync import scheduled

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


class Scheduler:
    def __init__(self, threads: Mapping[str, Callable[[], None]], choose: Chooser,
                 max_steps: int = 10_000) -> None:  # fmt: skip
        self._main = greenlet.getcurrent()
        self._choose = choose
        self._max_steps = max_steps
        self._names = list(threads)
        self._running = ""
        self._waiting: dict[str, Callable[[], bool]] = {}
        self.result = RunResult()
        self._greenlets = {n: greenlet(self._wrap(n, fn)) for n, fn in threads.items()}

    def _wrap(self, name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                fn()
                self.result.errors[name] = None
            except BaseException as exc:  # reported, not propagated
                self.result.errors[name] = exc

        return body

    # --- SchedulerHook -----------------------------------------------------------------

    def yield_point(self, label: str, obj: Hashable | None, write: bool) -> None:
        self._main.switch()

    def wait(self, label: str, ready: Callable[[], bool]) -> None:
        while not ready():
            self._waiting[self._running] = ready
            self._main.switch()
        self._waiting.pop(self._running, None)

    def current_thread(self) -> str:
        return self._running

    # --- driving -----------------------------------------------------------------------------

    def _runnable(self) -> list[str]:
        alive = [n for n in self._names if not self._greenlets[n].dead]
        return [n for n in alive if n not in self._waiting or self._waiting[n]()]

    def run(self) -> RunResult:
        with scheduled(self):
            for _ in range(self._max_steps):
                options = self._runnable()
                if not options:
                    break
                name = self._choose(options)
                self.result.schedule.append((name, tuple(options)))
                self._running = name
                self._greenlets[name].switch()
            self._running = ""
        for name in self._names:
            if not self._greenlets[name].dead:
                self.result.errors[name] = Deadlock(f"{name} blocked forever")
        return self.result


def run_in_order(threads: Mapping[str, Callable[[], None]], order: list[str]) -> RunResult:
    """Run with a fixed preference list: at each step the first runnable name of
    ``order`` (consumed as it is used; afterwards the first runnable thread)."""
    pending = list(order)

    def choose(options: list[str]) -> str:
        while pending:
            want = pending.pop(0)
            if want in options:
                return want
        return options[0]

    return Scheduler(threads, choose).run()


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

        result = Scheduler(threads, choose).run()
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
