"""The interleaving explorer's engine: searches over the scheduler core's runs.

Theory of operation
-------------------
A model thread is an ordinary callable.  The scheduler core (:mod:`vmferry.sched`) runs it
on its own greenlet; an :class:`Execution` is the core's scheduler with the explorer's
bookkeeping: whenever a thread calls :func:`vmferry.sync.yield_point` it records the access
the thread announces (``label``, ``obj``, ``write``) before the core switches back.  The
searches below are the core's *choosers*: they pick the thread for every step.  A *step*
is what a thread does from one switch to the next: the announced access and every line up
to the next yield point, atomically.  ``wait_until`` with a false condition parks the
thread as *blocked*; it is enabled again as soon as the condition holds.

Execution is deterministic: given the same instance factory and the same sequence of
thread choices, every run takes the same path.  That lets the explorer be *stateless*: to
try another branch it rebuilds the instance and replays the prefix of choices.

Exhaustive search is a depth-first walk over choice sequences with:

* a **preemption bound** -- switching away from a thread that could have continued costs
  one preemption; branches that would exceed the bound are not generated;
* **source-DPOR** (``reduction="dpor"``, see :mod:`vmferry.analysis.explore.dpor`): only
  the orders of racing steps are explored, with sleep sets;
* **sleep sets** (Godefroid) -- after exploring thread ``u`` at a node, ``u`` is put to
  sleep in the siblings' subtrees for as long as only steps independent of ``u``'s step
  run; a node whose enabled threads are all asleep is pruned.  Two steps are independent
  when their footprints share no object that one of them writes.  A footprint is the
  announced access plus every known :class:`~vmferry.sync.ModelLock` whose owner changed
  during the step (a release happens before its ``unlock`` yield point).  Thread start
  steps (unless the instance declares their access in ``Instance.starts``), and
  resumptions from a ``wait_until`` that declares no access, touch unknown state, so they
  are dependent with everything.  A thread whose next step takes a ``ModelLock`` is not
  enabled while another thread holds it (no blocked attempt is a step);
* optional **state hashing** -- when the instance provides ``state()``, a node whose
  (shared state, per-thread control path, last thread) was already explored with no more
  preemptions and no larger sleep set is pruned.

Objects named in footprints are given canonical numbers in order of first announcement.
A thread's pending access is announced before the node where it may be put to sleep, so
the same logical object gets the same number in every execution sharing that prefix.

Contract for model code: shared state is touched only *after* a yield point naming it
(the code before a thread's first yield point counts as touching everything).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmferry import sched, sync
from vmferry.analysis.explore.api import Instance
from vmferry.analysis.explore.fingerprint import fingerprint
from vmferry.errors import Deadlock, HazardError, NonTermination
from vmferry.sched import (
    START_LABEL,
    ModelThread,
    RandomChooser,
    Replay,
    ScheduleMismatch,
    Step,
    Stop,
    ThreadStatus,
)

__all__ = ["START_LABEL", "ScheduleMismatch", "Step", "ThreadStatus"]


@dataclass(frozen=True)
class Footprint:
    """What one step touches: canonical object numbers read and written."""

    reads: frozenset[int] = frozenset()
    writes: frozenset[int] = frozenset()
    #: dependent with every other step (thread start, resumption from a wait)
    everything: bool = False

    def dependent(self, other: Footprint) -> bool:
        if self.everything or other.everything:
            return True
        if self.writes & (other.writes | other.reads):
            return True
        return bool(other.writes & self.reads)


EVERYTHING = Footprint(everything=True)
#: one-object footprints by (canonical number, write), shared by every execution
_SINGLE: dict[tuple[int, bool], Footprint] = {}


class _Thread(ModelThread):
    """A model thread with the explorer's bookkeeping."""

    __slots__ = ("pc",)

    def __init__(self, name: str, owner: sched.Scheduler[Any], glet: Any) -> None:
        super().__init__(name, owner, glet)
        self.footprint: Footprint = EVERYTHING
        #: hash chain of the labels this thread has executed: its control path
        self.pc = 0


@dataclass(frozen=True)
class Outcome:
    """How one execution ended."""

    schedule: tuple[Step, ...]
    error: BaseException | None = None
    #: thread in which ``error`` was raised, or None (invariant, check, deadlock, budget)
    thread: str | None = None


def classify(exc: BaseException) -> str:
    """The hazard name reported for an exception raised by model code or checks."""
    if isinstance(exc, HazardError):
        return exc.hazard
    if isinstance(exc, AssertionError):
        return "assertion"
    return "exception"


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Execution(sched.Scheduler[_Thread]):
    """One run of an instance under explorer control: the core scheduler plus the
    footprint of every step, canonical object numbers, and the checks after each step."""

    thread_class = _Thread

    def __init__(self, instance: Instance, max_steps: int, chooser: Chooser, *,
                 paths: bool = True) -> None:
        if not instance.threads:
            raise ValueError("an instance needs at least one thread")
        #: keep each thread's control path (``pc``, part of :meth:`state_key`)
        self.paths = paths
        self.canon: dict[Hashable, int] = {}
        #: the footprint of a write / a read of one object, by object (see ``announce``)
        self._writes: dict[Hashable, Footprint] = {}
        self._reads: dict[Hashable, Footprint] = {}
        self.locks: list[sync.ModelLock] = []
        super().__init__(instance.threads, max_steps=max_steps, gates_locks=True)
        self.instance = instance
        self.invariant = instance.invariant
        self.chooser = chooser
        #: how the run ended when a step failed (set by ``advance``)
        self.outcome: Outcome | None = None
        for name, thread in self.threads.items():
            if name in instance.starts:
                thread.footprint = self.announce(instance.starts[name], True)

    # --- the core's hook -----------------------------------------------------------------

    def run(self, chooser: Any, depth: int = 0) -> Stop:
        """The core's :meth:`~vmferry.sched.Scheduler.run` -- the same steps, the same
        stops -- with its enabled set and calls looked up once per run rather than per
        step: the explorer runs it for every step it explores."""
        threads = list(self.threads.values())
        choose, advance, max_steps = chooser.choose, self.advance, self.max_steps
        ready_status, blocked_status = ThreadStatus.READY, ThreadStatus.BLOCKED
        while True:
            enabled = []
            for thread in threads:
                status = thread.status
                if status is ready_status:
                    gate = thread.gate
                    if gate is None or gate():
                        enabled.append(thread.name)
                elif status is blocked_status:
                    ready = thread.ready
                    assert ready is not None
                    if ready():
                        enabled.append(thread.name)
            if not enabled:
                return Stop.IDLE
            if depth >= max_steps:
                return Stop.BUDGET
            name = choose(self, depth, enabled)
            if name is None:
                return Stop.CUT
            if advance(depth, name):
                return Stop.STOPPED
            depth += 1

    def advance(self, depth: int, name: str) -> bool:
        footprint, error = self.step(name)
        chooser = self.chooser
        chooser.stepped(depth, name, footprint)
        if error is None:
            try:
                self.invariant()
            except Exception as exc:
                error, name = exc, ""
            else:
                return False
        self.outcome = Outcome(tuple(self.schedule), error, name or None)
        failed = getattr(chooser, "failed", None)
        if failed is not None:  # a chooser that looks past the failure (dpor)
            failed(self)
        return True

    # --- driving ------------------------------------------------------------------------

    def step(self, name: str) -> tuple[Footprint, BaseException | None]:
        """Run thread ``name`` for one step; returns its footprint and any error it raised."""
        thread = self.threads[name]
        fp = thread.footprint
        if self.paths:
            thread.pc = hash((thread.pc, thread.label))
        locks = self.locks
        if not locks:
            self.run_step(name)
            return fp, thread.error
        known = len(locks)
        owners = [lock.owner for lock in locks]
        self.run_step(name)
        if fp.everything or [lock.owner for lock in locks[:known]] == owners:
            return fp, thread.error
        canon = self.canon
        nums = frozenset(canon[locks[i]] for i in range(known) if locks[i].owner != owners[i])
        return Footprint(fp.reads, fp.writes | nums), thread.error

    def begin_step(self, thread: _Thread) -> None:
        """The core's, keeping each thread's control path as :meth:`step` does (the
        core's :meth:`~vmferry.sched.Scheduler.fast_forward` calls it)."""
        if self.paths:
            thread.pc = hash((thread.pc, thread.label))
        super().begin_step(thread)

    def blocked(self) -> list[str]:
        return [t.name for t in self.threads.values() if t.status is ThreadStatus.BLOCKED]

    def state_key(self) -> Hashable | None:
        """The instance's shared-state fingerprint plus every thread's own state.

        A thread's state is its control path (``pc``), its status, and the locals of its
        suspended model frames (code position and values, canonically numbered): two
        schedules that reach the same shared state with a thread holding different values
        it read earlier are different states.
        """
        if self.instance.state is None:
            return None
        if not self.paths:
            raise ValueError("state keys need the threads' control paths (paths=True)")
        threads = tuple(
            (t.name, t.pc, t.status.value, _frames(t.glet) if t.status is not
             ThreadStatus.DONE else ())
            for t in self.threads.values()
        )
        if self.instance.roots:  # one walk: frames refer into the shared model
            return (fingerprint(*self.instance.roots, threads), (), self.last)
        return (self.instance.state(), fingerprint(threads), self.last)

    # --- internals ----------------------------------------------------------------------

    def announce(self, obj: Hashable | None, write: bool) -> Footprint:
        if obj is None:
            return EVERYTHING
        if isinstance(obj, sync.Accesses):
            reads = frozenset(self._number(o) for o in obj.reads)
            writes = frozenset(self._number(o) for o in obj.writes)
            return Footprint(reads - writes, writes)
        known = self._writes if write else self._reads
        fp = known.get(obj)
        if fp is None:  # the first access of its kind to ``obj`` in this execution
            key = (self._number(obj), write)
            fp = _SINGLE.get(key)
            if fp is None:
                one = frozenset((key[0],))
                fp = _SINGLE[key] = Footprint(writes=one) if write else Footprint(reads=one)
            known[obj] = fp
        return fp

    def _number(self, obj: Hashable) -> int:
        num = self.canon.get(obj)
        if num is None:
            num = self.canon[obj] = len(self.canon)
            if isinstance(obj, sync.ModelLock):
                self.locks.append(obj)
        return num


_ENGINE_FILES = frozenset({__file__, sync.__file__, sched.__file__})


def _frames(glet: Any) -> tuple[tuple[str, int, dict[str, Any]], ...]:
    """The suspended model frames of a thread: (function, position, locals), innermost
    first; the explorer's, the scheduler core's and sync's own frames are left out."""
    out = []
    frame = glet.gr_frame if glet else None
    while frame is not None:
        code = frame.f_code
        if code.co_filename not in _ENGINE_FILES:
            out.append((code.co_qualname, frame.f_lasti, dict(frame.f_locals)))
        frame = frame.f_back
    return tuple(out)


def _checked(fn: Callable[[], None]) -> BaseException | None:
    try:
        fn()
    except Exception as exc:
        return exc
    return None


# --- one run along a chooser ------------------------------------------------------------


class Chooser(Protocol):
    """Decides the schedule of one execution."""

    def choose(self, execution: Execution, depth: int, enabled: list[str]) -> str | None:
        """The thread to run at ``depth`` (one of ``enabled``), or None to cut the run."""

    def stepped(self, depth: int, name: str, footprint: Footprint) -> None:
        """Thread ``name`` ran step ``depth``; ``footprint`` is what it touched."""

    def replayed(self) -> Sequence[str]:
        """The threads of the first steps of the run, if an earlier run of the same
        factory took exactly these choices and went on past them: they are replayed
        with no footprints, checks or calls to this chooser (their outcome is known)."""


def run_once(factory: Callable[[], Instance], max_steps: int, chooser: Chooser, *,
             paths: bool = True) -> Outcome | None:
    """Run one execution, asking ``chooser`` at every step past the prefix it says was
    run before (:meth:`Chooser.replayed`).  None if the chooser cut it.  ``paths``: keep
    the threads' control paths (a search that computes state keys needs them)."""
    execution = Execution(factory(), max_steps, chooser, paths=paths)
    try:
        prefix = chooser.replayed()
        execution.fast_forward(prefix)
        stop = execution.run(chooser, len(prefix))
        if stop is Stop.IDLE:
            return _end(execution)
        if stop is Stop.BUDGET:
            budget = NonTermination(
                f"no end after {len(execution.schedule)} steps (step budget {max_steps})"
            )
            return Outcome(tuple(execution.schedule), budget)
        if stop is Stop.CUT:
            return None
        return execution.outcome
    finally:
        execution.teardown()


def _end(execution: Execution) -> Outcome:
    schedule = tuple(execution.schedule)
    if not execution.finished():
        stuck = ", ".join(
            f"{t.name} at {t.label!r}" for t in execution.threads.values()
            if t.status is not ThreadStatus.DONE
        )
        return Outcome(schedule, Deadlock(f"every live thread is blocked: {stuck}"))
    return Outcome(schedule, _checked(execution.instance.check))


# --- search -----------------------------------------------------------------------------


@dataclass
class SearchLimits:
    preemption_bound: int | None = None
    max_depth: int | None = None
    max_schedules: int | None = None
    max_steps: int = 10_000
    #: "sleep": sleep sets over every enabled choice; "dpor": source-DPOR with sleep sets;
    #: "none": plain bounded enumeration (``por=False`` means "none" too)
    reduction: str = "sleep"
    por: bool = True
    state_hashing: bool = True
    #: stop at the first failing schedule
    stop_on_failure: bool = False
    #: dpor: reverse two critical sections on one lock only when they conflict on data
    lock_aware: bool = True
    #: explore the subtree below every node at this depth on its own (see
    #: :func:`vmferry.analysis.explore.dpor.split`); 0: one search
    split_depth: int = 0


@dataclass
class SearchStats:
    schedules: int = 0
    #: runs cut short: every enabled thread asleep (sleep sets) or a state seen before
    pruned: int = 0
    #: of ``pruned``, the runs cut because state hashing found an explored state
    pruned_by_state: int = 0
    complete: bool = True
    outcomes: list[Outcome] = field(default_factory=list)
    #: called after every counted run (progress displays); not part of the result
    on_record: Callable[[SearchStats], None] | None = field(default=None, repr=False,
                                                              compare=False)

    def record(self, outcome: Outcome | None) -> bool:
        """Count one run; True when it failed."""
        if outcome is None:
            self.pruned += 1
        else:
            self.schedules += 1
            if outcome.error is not None:
                self.outcomes.append(outcome)
        if self.on_record is not None:
            self.on_record(self)
        return outcome is not None and outcome.error is not None


@dataclass(slots=True)
class Node:
    """A point in the choice tree: the state reached after ``depth`` steps."""

    sleep: dict[str, Footprint]
    todo: list[str]
    preemptions: int
    #: thread that ran the step leading here, and whether it could continue
    last: str | None
    last_enabled: bool
    chosen: str = ""
    #: footprint of every choice explored here so far (the chosen one included)
    explored: dict[str, Footprint] = field(default_factory=dict)
    #: threads enabled here (DPOR adds backtrack choices among them)
    enabled: tuple[str, ...] = ()

    def cost(self, name: str) -> int:
        """Preemptions spent by running ``name`` here."""
        return 1 if self.last_enabled and name != self.last else 0


class Dfs:
    """Stateless depth-first search with preemption bounding, sleep sets, state hashing."""

    def __init__(self, factory: Callable[[], Instance], limits: SearchLimits) -> None:
        self.factory = factory
        self.limits = limits
        self.stack: list[Node] = []
        self.seen: dict[Hashable, list[tuple[int, frozenset[str]]]] = {}
        self.stats = SearchStats()
        #: nodes of a fixed prefix (a subtree search): never backtracked into
        self.base = 0
        #: the nodes at the bottom of the stack whose chosen step an earlier run took
        #: (and went on past): the next run replays them without looking
        self.known = 0

    def run(self) -> SearchStats:
        while True:
            cap = self.limits.max_schedules
            if cap is not None and self.stats.schedules >= cap:
                self.stats.complete = False
                break
            outcome = run_once(self.factory, self.limits.max_steps, self,
                               paths=self.limits.state_hashing)
            if self.stats.record(outcome) and self.limits.stop_on_failure:
                self.stats.complete = False
                break
            self._after_run()
            if not self._backtrack():
                break
        return self.stats

    def _after_run(self) -> None:
        """Hook: the run along the current stack ended."""

    def _backtrack(self) -> bool:
        while len(self.stack) > self.base:
            node = self.stack[-1]
            if node.todo:
                node.chosen = node.todo.pop(0)
                self.known = len(self.stack) - 1
                return True
            self.stack.pop()
        return False

    # --- Chooser ------------------------------------------------------------------------

    def replayed(self) -> list[str]:
        return [node.chosen for node in self.stack[: self.known]]

    def choose(self, execution: Execution, depth: int, enabled: list[str]) -> str | None:
        if depth < len(self.stack):
            return self.stack[depth].chosen
        if self.limits.max_depth is not None and depth >= self.limits.max_depth:
            return None
        node = self._new_node(execution, depth, enabled)
        if node is None:
            return None
        self.stack.append(node)
        return node.chosen

    def stepped(self, depth: int, name: str, footprint: Footprint) -> None:
        self.stack[depth].explored[name] = footprint

    # --- nodes --------------------------------------------------------------------------

    def _new_node(self, execution: Execution, depth: int, enabled: list[str]) -> Node | None:
        limits = self.limits
        sleep = self._inherited_sleep(depth) if limits.por else {}
        preemptions = self._preemptions_at(depth)
        if limits.state_hashing and not self._fresh_state(execution, preemptions, sleep):
            self.stats.pruned_by_state += 1
            return None
        last = execution.last
        node = Node(sleep, [], preemptions, last, last in enabled)
        todo = self._order(node, enabled)
        if not todo:
            return None
        node.chosen, node.todo = todo[0], todo[1:]
        return node

    def _inherited_sleep(self, depth: int) -> dict[str, Footprint]:
        if depth == 0:
            return {}
        parent = self.stack[depth - 1]
        chosen = parent.chosen
        taken = parent.explored[chosen]
        out: dict[str, Footprint] = {}
        if taken.everything:
            return out
        explored = parent.explored
        if len(explored) == 1 and not parent.sleep:
            return out  # only the step taken was explored here, nothing sleeps
        reads, writes = taken.reads, taken.writes
        touched = reads | writes
        for name, fp in parent.sleep.items():
            if name not in explored and not (
                    fp.everything or fp.writes & touched or writes & fp.reads):
                out[name] = fp
        for name, fp in explored.items():
            if name != chosen and not (
                    fp.everything or fp.writes & touched or writes & fp.reads):
                out[name] = fp
        return out

    def _preemptions_at(self, depth: int) -> int:
        if depth == 0:
            return 0
        parent = self.stack[depth - 1]
        return parent.preemptions + parent.cost(parent.chosen)

    def _fresh_state(
        self, execution: Execution, preemptions: int, sleep: Mapping[str, Footprint]
    ) -> bool:
        if not self.limits.state_hashing:
            return True
        key = execution.state_key()
        if key is None:
            return True
        asleep = frozenset(sleep)
        visits = self.seen.setdefault(key, [])
        if any(pre <= preemptions and slept <= asleep for pre, slept in visits):
            return False
        visits.append((preemptions, asleep))
        return True

    def _order(self, node: Node, enabled: list[str]) -> list[str]:
        """The awake choices within the bound, the running thread first."""
        sleep, last = node.sleep, node.last
        awake = [n for n in enabled if n not in sleep] if sleep else list(enabled)
        if last in awake and awake[0] != last:
            awake.remove(last)
            awake.insert(0, last)
        bound = self.limits.preemption_bound
        if bound is not None and node.preemptions > bound:
            return []
        if bound is None or node.preemptions + 1 <= bound or not node.last_enabled:
            return awake  # no choice costs more than the bound allows
        return [last] if last in awake else []


class _Unobserved:
    """One of the core's choosers, as an explorer chooser that ignores footprints."""

    def __init__(self, chooser: sched.Chooser[Execution]) -> None:
        self.choose = chooser.choose

    def stepped(self, depth: int, name: str, footprint: Footprint) -> None:
        return None

    def replayed(self) -> Sequence[str]:
        return ()


def random_walks(
    factory: Callable[[], Instance], limits: SearchLimits, seed: int, runs: int,
    progress: Callable[[SearchStats], None] | None = None,
) -> SearchStats:
    """``runs`` executions with seeded random choices (seed ``seed``, ``seed+1``, ...)."""
    stats = SearchStats(complete=False, on_record=progress)
    for i in range(runs):
        walker = _Unobserved(RandomChooser(random.Random(seed + i)))
        if stats.record(run_once(factory, limits.max_steps, walker)) and limits.stop_on_failure:
            break
    stats.on_record = None
    return stats


def run_schedule(factory: Callable[[], Instance], steps: Sequence[Step], max_steps: int) -> Outcome:
    """Re-run one recorded schedule exactly."""
    outcome = run_once(factory, max_steps, _Unobserved(Replay(steps)))
    assert outcome is not None  # a replay never cuts a run
    if outcome.error is None and len(outcome.schedule) < len(steps):
        raise ScheduleMismatch(
            f"the run ends after {len(outcome.schedule)} of the {len(steps)} recorded steps"
        )
    return outcome
