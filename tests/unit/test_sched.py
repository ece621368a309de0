"""The scheduler core (vmferry.sched): choosers, the per-context hook, teardown.

Issue 14 item 6: one scheduler core with pluggable choosers, and the hook held per
context, so that two schedulers running at once do not see each other's threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from vmferry import sync
from vmferry.errors import Deadlock, UseAfterFree
from vmferry.sched import (
    ModelThread,
    RandomChooser,
    Replay,
    ScheduleMismatch,
    Scheduler,
    Scripted,
    Stop,
    ThreadStatus,
    hazard,
    run_random,
)
from vmferry.sync import ModelLock, current_thread, wait_until, yield_point


def _steppers(log: list[str], names: tuple[str, ...], steps: int) -> dict[str, Callable[[], Any]]:
    def make(name: str) -> Callable[[], int]:
        def body() -> int:
            for i in range(steps):
                yield_point(f"{name}.{i}")
                log.append(f"{current_thread()}:{i}")
            return steps

        return body

    return {name: make(name) for name in names}


def _run(threads: dict[str, Callable[[], Any]], chooser: Any, **kw: Any
         ) -> Scheduler[ModelThread]:
    core: Scheduler[ModelThread] = Scheduler(threads, **kw)
    try:
        core.run(chooser)
    finally:
        core.teardown()
    return core


def test_scripted_order_is_followed_and_recorded() -> None:
    log: list[str] = []
    core = _run(_steppers(log, ("a", "b"), 2), Scripted(["a", "b", "b", "a", "b", "a"]))
    # a start, b start, b runs step 0, a runs step 0, b step 1 and ends, a step 1
    assert log == ["b:0", "a:0", "b:1", "a:1"]
    assert [name for name, _ in core.schedule] == ["a", "b", "b", "a", "b", "a"]
    assert core.schedule[2] == ("b", "b.0")
    assert core.finished() and core.threads["a"].result == 2


def test_random_chooser_same_seed_same_run() -> None:
    runs = []
    for _ in range(2):
        log: list[str] = []
        core = _run(_steppers(log, ("a", "b", "c"), 5), RandomChooser(7))
        runs.append((log, core.schedule))
    assert runs[0] == runs[1]
    other: list[str] = []
    _run(_steppers(other, ("a", "b", "c"), 5), RandomChooser(8))
    assert sorted(other) == sorted(runs[0][0])


def test_replay_follows_a_recorded_schedule_and_refuses_a_divergent_one() -> None:
    log: list[str] = []
    first = _run(_steppers(log, ("a", "b"), 3), RandomChooser(3))
    again: list[str] = []
    second = _run(_steppers(again, ("a", "b"), 3), Replay(first.schedule))
    assert second.schedule == first.schedule and again == log
    bad = [("a", "start"), ("a", "wrong-label")]
    with pytest.raises(ScheduleMismatch, match=r"step 2: a is at 'a\.0'"):
        _run(_steppers([], ("a", "b"), 3), Replay(bad))
    with pytest.raises(ScheduleMismatch, match="thread 'zz' cannot run"):
        _run(_steppers([], ("a", "b"), 3), Replay([("zz", "start")]))


def test_the_hook_is_held_only_in_the_model_threads_contexts() -> None:
    seen: dict[str, object] = {}

    def body() -> None:
        seen["hook"] = sync.current_hook()
        seen["name"] = current_thread()

    core: Scheduler[ModelThread] = Scheduler({"t": body})
    assert sync.current_hook() is None
    core.run(Scripted([]))
    assert seen == {"hook": core.threads["t"], "name": "t"}
    assert sync.current_hook() is None and current_thread() == sync.MAIN_THREAD
    yield_point("outside")  # no hook here: returns at once
    with pytest.raises(Deadlock):
        wait_until("outside", lambda: False)


def test_two_os_threads_each_with_its_own_scheduler_at_once() -> None:
    """Each OS thread runs a scheduler over its own model threads; both are mid-run at
    the same time (each waits at a step for the other to have started).  Each run
    follows its own script and sees only its own threads: a process-wide hook would hand
    one thread's yield points to the other's scheduler."""
    started = {side: threading.Event() for side in ("left", "right")}
    results: dict[str, tuple[list[str], list[str]]] = {}
    errors: list[BaseException] = []

    class Meet(Scripted):
        def __init__(self, side: str, other: str, order: list[str]) -> None:
            super().__init__(order)
            self.side, self.other = side, other

        def choose(self, sched: Scheduler[Any], depth: int, enabled: list[str]) -> str | None:
            if depth == 3:  # both model threads are suspended at a yield point now
                started[self.side].set()
                if not started[self.other].wait(timeout=60):
                    raise AssertionError("the other scheduler never started")
            return super().choose(sched, depth, enabled)

    def side(name: str, other: str) -> None:
        try:
            log: list[str] = []
            names = (f"{name}1", f"{name}2")
            order = [names[i % 2] for i in range(200)]
            core = _run(_steppers(log, names, 50), Meet(name, other, order))
            assert core.finished() and sync.current_hook() is None
            results[name] = (log, [n for n, _ in core.schedule])
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=side, args=("left", "right")),
               threading.Thread(target=side, args=("right", "left"))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    for name in ("left", "right"):
        log, schedule = results[name]
        one, two = f"{name}1", f"{name}2"
        assert schedule == [one, two] * 51  # strictly alternating, as scripted
        assert log == [x for i in range(50) for x in (f"{one}:{i}", f"{two}:{i}")]


def test_nested_scheduler_inside_a_model_thread() -> None:
    inner_log: list[str] = []
    outer_log: list[str] = []

    def outer() -> None:
        yield_point("before")
        core = _run(_steppers(inner_log, ("x", "y"), 2), Scripted(["x", "y"] * 4))
        assert core.finished()
        outer_log.append(current_thread())  # still the outer thread's own hook
        yield_point("after")

    core = _run({"o": outer, "p": lambda: outer_log.append(current_thread())},
                Scripted(["o", "o", "p", "o"]))
    assert core.finished() and outer_log == ["o", "p"]
    assert inner_log == ["x:0", "y:0", "x:1", "y:1"]


def test_blocked_threads_wake_when_their_condition_holds() -> None:
    flag: list[bool] = []

    def waiter() -> str:
        wait_until("flag", lambda: bool(flag))
        return "woke"

    def setter() -> None:
        yield_point("set")
        flag.append(True)

    core = _run({"w": waiter, "s": setter}, Scripted(["w", "s"]))
    assert core.finished() and core.threads["w"].result == "woke"
    assert [label for _, label in core.schedule] == ["start", "start", "set", "resume flag"]


def test_deadlock_leaves_threads_stuck_and_teardown_unwinds_them() -> None:
    unwound: list[str] = []

    def forever() -> None:
        try:
            wait_until("never", lambda: False)
        finally:
            unwound.append(current_thread())

    core: Scheduler[ModelThread] = Scheduler({"a": forever, "b": forever})
    assert core.run(RandomChooser(0)) is Stop.IDLE
    assert not core.finished() and core.stuck() == ["a", "b"]
    assert all(t.status is ThreadStatus.BLOCKED for t in core.threads.values())
    core.teardown()
    assert unwound == ["a", "b"] and core.stuck() == ["a", "b"]


def test_lock_gating_holds_back_a_thread_until_the_lock_is_free() -> None:
    lock = ModelLock("m")

    def holder() -> None:
        with lock:
            yield_point("inside")

    def other() -> None:
        with lock:
            pass

    gated = _run({"h": holder, "o": other}, Scripted(["h", "h"]), gates_locks=True)
    # after h took the lock, o (paused before taking it) was not enabled: h went on
    assert [n for n, _ in gated.schedule][:3] == ["h", "h", "h"]
    plain = _run({"h": holder, "o": other}, Scripted(["h", "h", "o", "o"]))
    assert plain.finished()
    assert ("o", "resume lock m") in plain.schedule  # it ran, found the lock held, blocked


def test_step_budget_and_cut() -> None:
    def spin() -> None:
        while True:
            yield_point("spin")

    core: Scheduler[ModelThread] = Scheduler({"s": spin}, max_steps=25)
    assert core.run(RandomChooser(0)) is Stop.BUDGET and len(core.schedule) == 25
    core.teardown()
    assert core.stuck() == ["s"]

    class Cut:
        def choose(self, sched: Scheduler[Any], depth: int, enabled: list[str]) -> str | None:
            return None if depth == 3 else enabled[0]

    cut: Scheduler[ModelThread] = Scheduler({"s": spin})
    assert cut.run(Cut()) is Stop.CUT and len(cut.schedule) == 3
    cut.teardown()


def test_run_random_reports_a_hazard_and_reraises_other_errors() -> None:
    def bad() -> None:
        yield_point("x")
        raise UseAfterFree("freed object used")

    runner = run_random({"a": bad, "b": lambda: None}, seed=1)
    assert hazard(runner) == "use-after-free: freed object used"

    def broken() -> None:
        raise KeyError("not a hazard")

    with pytest.raises(KeyError, match="not a hazard"):
        run_random({"a": broken})


def test_bad_thread_names_are_refused() -> None:
    for name in ("", "two words", sync.MAIN_THREAD):
        with pytest.raises(ValueError, match="bad thread name"):
            Scheduler({name: lambda: None})
