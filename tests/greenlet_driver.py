"""A tiny deterministic scheduler for scenario threads (until the explorer lands).

Each model thread runs on a greenlet; every ``yield_point``/lock wait switches back here
and the driver picks the next thread from a *policy*: a list of thread names consumed one
per step (then round-robin), so tests can force a few hand-picked interleavings, and
``all_schedules`` enumerates every schedule up to a bound by depth-first replay.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import greenlet

from vmferry.analysis.explore.api import Instance
from vmferry.errors import HazardError
from vmferry.sync import scheduled


class _Hook:
    def __init__(self, driver: Driver) -> None:
        self.d = driver

    def yield_point(self, label: str, obj: Hashable | None, write: bool) -> None:
        self.d.labels.append((self.d.running, label))
        self.d.main.switch()

    def wait(self, label: str, ready: Callable[[], bool]) -> None:
        while not ready():
            self.d.blocked[self.d.running] = ready
            self.d.main.switch()
        self.d.blocked.pop(self.d.running, None)

    def current_thread(self) -> str:
        return self.d.running


class Driver:
    def __init__(self, instance: Instance, choices: Sequence[str]) -> None:
        self.instance = instance
        self.choices = list(reversed(choices))  # popped from the end
        self.labels: list[tuple[str, str]] = []
        self.blocked: dict[str, Callable[[], bool]] = {}
        self.running = ""
        self.trace: list[str] = []
        self.main = greenlet.getcurrent()

    def run(self) -> BaseException | None:
        lets = {name: greenlet.greenlet(fn) for name, fn in self.instance.threads.items()}
        with scheduled(_Hook(self)):
            try:
                while lets:
                    name = self._pick(lets)
                    self.running = name
                    self.trace.append(name)
                    lets[name].switch()
                    if lets[name].dead:
                        del lets[name]
                    self.instance.invariant()
                self.instance.check()
            except (HazardError, AssertionError) as exc:
                return exc
            finally:
                self._reap(lets)
        return None

    def _reap(self, lets: dict[str, greenlet.greenlet]) -> None:
        """Unwind unfinished threads now (not at some later garbage collection)."""
        for name, g in lets.items():
            self.running = name
            if not g:  # never started
                continue
            try:
                g.throw(greenlet.GreenletExit)
                while not g.dead:
                    g.switch()
            except (greenlet.GreenletExit, HazardError, AssertionError):
                pass

    def _pick(self, lets: dict[str, greenlet.greenlet]) -> str:
        ready = [n for n in lets if n not in self.blocked or self.blocked[n]()]
        while self.choices:
            want = self.choices[-1]
            if want in ready:
                self.choices.pop()
                return want
            if want not in lets:  # finished: drop its whole run of choices
                while self.choices and self.choices[-1] == want:
                    self.choices.pop()
            else:
                self.choices.pop()
        return sorted(ready)[len(self.trace) % len(ready)]


def single_preemption_schedules(build: Callable[[], Instance], first: str, second: str,
                                max_k: int = 400) -> list[tuple[list[str], BaseException | None]]:
    """Run ``first`` for k steps, then ``second`` to completion, then the rest; every k.

    Stops once ``first`` finishes within its k steps (larger k give the same schedule).
    """
    out: list[tuple[list[str], BaseException | None]] = []
    for k in range(max_k):
        d = Driver(build(), [first] * k + [second] * 100_000)
        err = d.run()
        out.append((d.trace, err))
        if d.trace.count(first) < k:  # first finished within its budget
            break
    return out
