"""The explorer's zoo: small deliberately racy programs it must catch, race-free ones it
must pass, and replay round-trips."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vmferry.analysis.explore import (
    Instance,
    ReplayScriptError,
    Report,
    ScheduleMismatch,
    explore,
    parse_script,
    replay,
)
from vmferry.errors import ConfigError, DoubleFree, UseAfterFree
from vmferry.sync import ModelLock, wait_until, yield_point
from vmferry.testing.explore import assert_hazard

# --- programs ---------------------------------------------------------------------------


class Cell:
    def __init__(self, value: object = 0) -> None:
        self.value = value


def lost_update(locked: bool) -> Instance:
    counter = Cell(0)
    lock = ModelLock("counter")

    def incr() -> None:
        if locked:
            lock.acquire()
        yield_point("read counter", counter, write=False)
        seen = counter.value
        yield_point("write counter", counter, write=True)
        counter.value = seen + 1
        if locked:
            lock.release()

    def check() -> None:
        assert counter.value == 2, f"counter is {counter.value}, expected 2"

    return Instance({"A": incr, "B": incr}, check=check, state=lambda: counter.value)


def check_then_act(locked: bool) -> Instance:
    slot = Cell(None)
    claims: list[str] = []
    lock = ModelLock("slot")

    def claimer(me: str) -> Callable[[], None]:
        def run() -> None:
            if locked:
                lock.acquire()
            yield_point("test slot", slot, write=False)
            if slot.value is None:
                yield_point("set slot", slot, write=True)
                slot.value = me
                claims.append(me)
            if locked:
                lock.release()

        return run

    def invariant() -> None:
        assert len(claims) <= 1, f"slot claimed by {claims}"

    return Instance({"A": claimer("A"), "B": claimer("B")}, invariant=invariant)


class Node:
    def __init__(self, name: str, nxt: Node | None) -> None:
        self.name = name
        self._next = nxt
        self.freed = False

    @property
    def next(self) -> Node | None:
        if self.freed:
            raise UseAfterFree(f"node {self.name} read after free")
        return self._next

    @next.setter
    def next(self, value: Node | None) -> None:
        if self.freed:
            raise UseAfterFree(f"node {self.name} written after free")
        self._next = value


class Stack:
    """A Treiber stack whose compare-and-swap compares pointers only (ABA-prone)."""

    def __init__(self, *names: str) -> None:
        top: Node | None = None
        for name in reversed(names):
            top = Node(name, top)
        self.top = top

    def cas(self, old: Node | None, new: Node | None) -> bool:
        yield_point("cas top", self, write=True)
        if self.top is old:
            self.top = new
            return True
        return False

    def pop(self) -> Node | None:
        while True:
            yield_point("read top", self, write=False)
            old = self.top
            if old is None:
                return None
            yield_point(f"read {old.name}.next", old, write=False)
            nxt = old.next
            if self.cas(old, nxt):
                return old

    def push(self, node: Node) -> None:
        while True:
            yield_point("read top", self, write=False)
            old = self.top
            yield_point(f"write {node.name}.next", node, write=True)
            node.next = old
            if self.cas(old, node):
                return


def aba() -> Instance:
    stack = Stack("a", "b", "c")

    def popper() -> None:
        stack.pop()

    def recycler() -> None:
        a = stack.pop()
        b = stack.pop()
        assert a is not None and b is not None
        b.freed = True
        stack.push(a)

    def check() -> None:
        node = stack.top
        while node is not None:
            node = node.next  # raises UseAfterFree if a freed node is linked

    return Instance({"P": popper, "R": recycler}, check=check)


class Obj:
    def __init__(self) -> None:
        self.freed = False

    def free(self) -> None:
        if self.freed:
            raise DoubleFree("object freed twice")
        self.freed = True


def double_free(locked: bool) -> Instance:
    obj = Obj()
    lock = ModelLock("obj")

    def put() -> None:
        if locked:
            lock.acquire()
        yield_point("test freed", obj, write=False)
        if not obj.freed:
            yield_point("free", obj, write=True)
            obj.free()
        if locked:
            lock.release()

    return Instance({"A": put, "B": put})


def lock_order(consistent: bool) -> Instance:
    first, second = ModelLock("A"), ModelLock("B")

    def forward() -> None:
        with first, second:
            yield_point("work", "data")

    def backward() -> None:
        outer, inner = (first, second) if consistent else (second, first)
        with outer, inner:
            yield_point("work", "data")

    return Instance({"T1": forward, "T2": backward})


def livelock(fixed: bool) -> Instance:
    owner = Cell(None)

    def claim(me: str) -> Callable[[], None]:
        def run() -> None:
            while True:
                yield_point("read owner", owner, write=False)
                if owner.value is None:
                    yield_point("write owner", owner, write=True)
                    owner.value = me
                yield_point("verify owner", owner, write=False)
                if owner.value == me:
                    break
                if fixed:
                    return  # lost the race: give up instead of retrying forever
            yield_point("release owner", owner, write=True)

        return run

    return Instance({"A": claim("A"), "B": claim("B")})


def blocking_handoff() -> Instance:
    """Race-free producer/consumer through wait_until."""
    box = Cell(None)
    got: list[object] = []

    def producer() -> None:
        yield_point("put", box, write=True)
        box.value = 42

    def consumer() -> None:
        wait_until("box full", lambda: box.value is not None)
        yield_point("take", box, write=True)
        got.append(box.value)

    def check() -> None:
        assert got == [42]

    return Instance({"P": producer, "C": consumer}, check=check)


def independent(n: int) -> Instance:
    cells = [Cell(0) for _ in range(n)]

    def worker(i: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(3):
                yield_point(f"bump {i}", cells[i], write=True)
                cells[i].value = int(str(cells[i].value)) + 1

        return run

    return Instance({f"T{i}": worker(i) for i in range(n)})


# --- helpers ------------------------------------------------------------------------------


def run(factory: Callable[[], Instance], **kw: object) -> Report:
    return explore(factory, failures_dir=None, **kw)  # type: ignore[arg-type]


def hazards(report: Report) -> set[str]:
    return {f.hazard for f in report.failures}


def shortest(report: Report) -> int:
    return min(len(f.schedule) for f in report.failures)


# --- racy programs are caught --------------------------------------------------------------


def test_lost_update_caught_with_short_schedule() -> None:
    report = run(lambda: lost_update(False))
    assert hazards(report) == {"assertion"}
    assert report.complete
    assert shortest(report) <= 8


def test_check_then_act_caught() -> None:
    report = run(lambda: check_then_act(False))
    assert hazards(report) == {"assertion"}
    assert shortest(report) <= 8


def test_aba_caught_as_use_after_free() -> None:
    report = run(aba)
    assert "use-after-free" in hazards(report)


def test_double_free_caught() -> None:
    report = run(lambda: double_free(False))
    assert hazards(report) == {"double-free"}
    assert shortest(report) <= 8


def test_lock_order_deadlock_caught() -> None:
    report = run(lambda: lock_order(False))
    assert hazards(report) == {"deadlock"}
    assert "every live thread is blocked" in report.failures[0].message


def test_livelock_caught_as_non_termination() -> None:
    report = run(lambda: livelock(False), max_steps=40)
    assert "non-termination" in hazards(report)
    failure = next(f for f in report.failures if f.hazard == "non-termination")
    assert len(failure.script().splitlines()) < 30  # repeated steps are folded


# --- race-free programs pass ---------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda: lost_update(True),
        lambda: check_then_act(True),
        lambda: double_free(True),
        lambda: lock_order(True),
        lambda: livelock(True),
        blocking_handoff,
    ],
    ids=["locked-counter", "locked-claim", "locked-free", "ordered-locks", "give-up", "handoff"],
)
def test_race_free_programs_pass(factory: Callable[[], Instance]) -> None:
    report = run(factory, max_steps=200)
    assert report.failures == []
    assert report.complete
    assert report.schedules_explored >= 1


# --- search machinery ---------------------------------------------------------------------


def test_por_finds_the_same_bugs_with_fewer_schedules() -> None:
    for factory in (lambda: lost_update(False), lambda: double_free(False), aba):
        naive = run(factory, strategy="naive", preemption_bound=2)
        for strategy in ("sleep", "dpor"):
            reduced = run(factory, strategy=strategy, preemption_bound=2)
            assert hazards(naive) == hazards(reduced), strategy
            assert reduced.schedules_explored <= naive.schedules_explored


def test_independent_threads_collapse() -> None:
    naive = run(lambda: independent(2), por=False, state_hashing=False)
    assert naive.schedules_explored == 70  # 8! / (4! 4!): start + 3 bumps per thread
    reduced = run(lambda: independent(2), state_hashing=False)
    assert reduced.schedules_explored < 10
    # three threads: 12! / (4!)^3 = 34650 naive interleavings
    assert run(lambda: independent(3), state_hashing=False).schedules_explored < 300


def test_preemption_bound_zero_runs_threads_to_completion() -> None:
    report = run(lambda: lost_update(False), preemption_bound=0, por=False, state_hashing=False)
    assert report.failures == []  # the bug needs a preemption
    assert report.schedules_explored == 2  # A then B, B then A
    preempted = run(lambda: lost_update(False), preemption_bound=1)
    assert_hazard(preempted, "assertion", "counter is 1, expected 2")


def test_random_walk_is_seeded_and_finds_the_bug() -> None:
    first = run(lambda: lost_update(False), strategy="random", seed=7, max_schedules=60)
    again = run(lambda: lost_update(False), strategy="random", seed=7, max_schedules=60)
    assert first.schedules_explored == 60
    assert not first.complete
    assert [f.schedule for f in first.failures] == [f.schedule for f in again.failures]
    assert hazards(first) == {"assertion"}


def test_max_schedules_makes_report_incomplete() -> None:
    report = run(lambda: independent(2), por=False, max_schedules=3, state_hashing=False)
    assert report.schedules_explored == 3
    assert not report.complete


def test_bad_strategy_and_bound_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        run(lambda: lost_update(False), strategy="bfs")
    with pytest.raises(ConfigError):
        run(lambda: lost_update(False), preemption_bound=-1)


def test_report_json_shape() -> None:
    data = run(lambda: double_free(False)).to_json()
    for key in ("scenario", "mode", "schedules_explored", "pruned", "failures", "elapsed_s",
                "complete"):
        assert key in data
    failure = data["failures"][0]
    assert {"case", "hazard", "message", "schedule"} <= set(failure)
    assert all(len(step) == 2 for step in failure["schedule"])


# --- replay -----------------------------------------------------------------------------------


def test_replay_round_trip_from_text_and_file(tmp_path: Path) -> None:
    report = explore(lambda: aba(), failures_dir=tmp_path)
    failure = report.failures[0]
    assert failure.path is not None and Path(failure.path).is_file()
    for source in (failure.script(), failure.path):
        result = replay(source, aba)
        assert result.reproduced
        assert result.failure is not None
        assert result.failure.schedule == failure.schedule
        assert result.failure.message == failure.message


def test_replay_of_deadlock_and_non_termination() -> None:
    for factory, kw in ((lambda: lock_order(False), {}), (lambda: livelock(False), {})):
        report = run(factory, max_steps=40, **kw)
        result = replay(report.failures[0].script(), factory, max_steps=40)
        assert result.reproduced


def test_replay_detects_a_schedule_that_no_longer_fits() -> None:
    script = run(lambda: lost_update(False)).failures[0].script()
    broken = script.replace("write counter", "write kounter", 1)
    with pytest.raises(ScheduleMismatch):
        replay(broken, lambda: lost_update(False))


def test_malformed_scripts_are_rejected() -> None:
    with pytest.raises(ReplayScriptError):
        parse_script("not a script\n")
    with pytest.raises(ReplayScriptError):
        parse_script("vmferry-explore-replay 1\nscenario x\nstep A\n")
    with pytest.raises(ReplayScriptError):
        parse_script("vmferry-explore-replay 1\nsteps 0 A x\n")
    with pytest.raises(ReplayScriptError):
        replay("vmferry-explore-replay 1\nscenario -\nmode -\ncase x\nhazard h\nmessage m\n")


def counters(n: int) -> Instance:
    """Threads bumping one shared counter under a lock: many orders, few states."""
    counter = Cell(0)
    lock = ModelLock("counter")

    def bump() -> None:
        for _ in range(2):
            with lock:
                yield_point("bump", counter)
                counter.value = int(str(counter.value)) + 1

    def check() -> None:
        assert counter.value == 2 * n

    return Instance({f"T{i}": bump for i in range(n)}, check=check,
                    state=lambda: (counter.value, lock.owner))


def test_state_hashing_prunes_converging_orders() -> None:
    plain = run(lambda: counters(2), strategy="sleep", state_hashing=False, preemption_bound=3)
    hashed = run(lambda: counters(2), strategy="sleep", preemption_bound=3)
    assert plain.failures == hashed.failures == []
    assert hashed.schedules_explored < plain.schedules_explored
    assert hashed.pruned_by_state > 0 and hashed.complete
