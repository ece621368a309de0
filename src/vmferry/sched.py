"""The one scheduler core: model threads on greenlets, one step at a time, a chooser decides.

Theory of operation
-------------------
A :class:`Scheduler` runs a set of named *model threads* (plain callables) concurrently on
greenlets.  Model code marks the points where another thread could run with
:func:`vmferry.sync.yield_point`, blocks with :func:`vmferry.sync.wait_until` and takes
:class:`vmferry.sync.ModelLock` locks; those calls reach the scheduler through the *hook*
held in the calling greenlet's contextvars context.  Each greenlet the scheduler creates
gets its own context (a copy of its creator's) whose hook is the greenlet's own
:class:`ModelThread`.  So the hook is per context, never process-wide: code outside a
model thread (the driver, checks, other OS threads) sees no hook, and two schedulers
running at once -- in two OS threads, or one nested in a model thread of another -- never
see each other's threads.

A *step* is what one thread does from one switch to the next.  :meth:`Scheduler.run`
loops: it computes the *enabled* threads (paused at a yield point, and not waiting for a
model lock another thread holds when the scheduler gates locks; or blocked on a condition
that now holds), asks the *chooser* which one goes (``None`` cuts the run), runs it for one
step and lets :meth:`Scheduler.advance` say whether to stop.  The run ends when no
thread is enabled (every thread done, or the rest blocked: a deadlock), at the step
budget, when the chooser cuts it, or when ``advance`` stops it (by default: the first
thread that raised).  :meth:`Scheduler.teardown` unwinds the threads still suspended.

Choosers are objects with ``choose(scheduler, depth, enabled) -> name | None``: the
seeded :class:`RandomChooser`, :class:`Replay` of a recorded (thread, label) schedule,
the lenient :class:`Scripted` preference list, and the explorer's depth-first and DPOR
searches (``vmferry.analysis.explore``), whose :class:`Scheduler` subclass records the
access each step declares (:meth:`Scheduler.announce`).

This module sits in the base layer beside :mod:`vmferry.sync` (hw models use it); it
imports nothing else from vmferry but the error tree.
"""

from __future__ import annotations

import contextvars
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from enum import Enum
from typing import Any, Generic, Protocol, Self, TypeVar

import greenlet

from vmferry import sync
from vmferry.errors import HazardError

START_LABEL = "start"
DONE_LABEL = "done"

Step = tuple[str, str]
"""One scheduling step as recorded: (thread name, label of the point it started at)."""


class Abort(BaseException):
    """Thrown into suspended threads when a run is torn down."""


class ScheduleMismatch(ValueError):
    """A recorded schedule does not fit the program it is replayed against."""


class ThreadStatus(Enum):
    READY = "ready"  # paused at a yield point (or not started)
    BLOCKED = "blocked"  # waiting for a condition
    DONE = "done"


class ModelThread:
    """One model thread: its greenlet, where it is paused, and how it ended.

    It is the :class:`vmferry.sync.SchedulerHook` held in its greenlet's context, so the
    ``sync`` calls made by its code come here.

    Invariants: ``ready`` is set exactly while ``status`` is BLOCKED; ``gate`` only while
    the thread is paused before taking a model lock (schedulers that gate locks);
    ``error``/``result`` are final once ``status`` is DONE.
    """

    __slots__ = (
        "aborted",
        "error",
        "footprint",
        "gate",
        "glet",
        "label",
        "name",
        "ready",
        "result",
        "run_on",
        "sched",
        "status",
    )

    def __init__(self, name: str, sched: Scheduler[Any], glet: Any) -> None:
        self.name = name
        self.sched = sched
        self.glet = glet
        self.status = ThreadStatus.READY
        self.label = START_LABEL
        self.ready: Callable[[], bool] | None = None
        #: a READY thread whose next step takes a lock is enabled only while ``gate()``
        self.gate: Callable[[], bool] | None = None
        self.error: BaseException | None = None
        self.result: Any = None
        #: what the scheduler's ``announce`` made of the access declared for the next step
        self.footprint: Any = None
        #: unwound by a teardown before it ended
        self.aborted = False
        #: steps to go on with at the next yield points without switching back
        #: (:meth:`Scheduler.fast_forward`)
        self.run_on = 0

    # --- SchedulerHook ------------------------------------------------------------------

    def yield_point(self, label: str, obj: Hashable | None, write: bool) -> None:
        sched = self.sched
        if sched.aborting:
            raise Abort
        self.label = label
        self.footprint = sched.announce(obj, write)
        if self.run_on:  # a replayed step of this thread follows: no switch
            self.run_on -= 1
            sched.begin_step(self)
            return
        sched.driver.switch()
        if sched.aborting:
            raise Abort

    def acquire_point(self, label: str, lock: sync.ModelLock) -> None:
        if not self.sched.gates_locks:
            self.yield_point(label, lock, True)
            return
        name = self.name
        self.gate = lambda: lock.owner is None or lock.owner == name
        try:
            self.yield_point(label, lock, True)
        finally:
            self.gate = None

    def wait(self, label: str, ready: Callable[[], bool], obj: Hashable | None,
             write: bool) -> None:
        sched = self.sched
        while not ready():
            if sched.aborting:
                raise Abort
            self.status = ThreadStatus.BLOCKED
            self.label = f"resume {label}"
            self.footprint = sched.announce(obj, write)
            self.ready = ready
            sched.driver.switch()
            if sched.aborting:
                raise Abort

    def __repr__(self) -> str:
        return f"ModelThread({self.name!r}, {self.status.value}, at {self.label!r})"


class Stop(Enum):
    """Why :meth:`Scheduler.run` returned."""

    IDLE = "idle"  # no thread enabled: all done, or the rest blocked (see ``finished``)
    BUDGET = "budget"  # the step budget ran out
    CUT = "cut"  # the chooser returned None
    STOPPED = "stopped"  # ``advance`` stopped the run (by default: a thread raised)


S_contra = TypeVar("S_contra", bound="Scheduler[Any]", contravariant=True)
T = TypeVar("T", bound=ModelThread)


class Chooser(Protocol[S_contra]):
    """Decides which enabled thread runs next."""

    def choose(self, sched: S_contra, depth: int, enabled: list[str]) -> str | None:
        """The thread to run for step ``depth`` (one of ``enabled``), or None to cut."""


class Scheduler(Generic[T]):
    """Runs model threads on greenlets step by step; a chooser picks who goes next.

    ``stop_on_error``: the run stops after the step in which a thread raised (the
    exception is in that thread's ``error``); otherwise the other threads go on.
    ``gates_locks``: a thread about to take a held :class:`~vmferry.sync.ModelLock` is not
    enabled (the explorer's view: no blocked attempt is a step); otherwise it runs, finds
    the lock held and blocks.  Raises ValueError for a bad thread name.
    """

    thread_class: type[ModelThread] = ModelThread

    def __init__(self, threads: Mapping[str, Callable[[], Any]], *, max_steps: int = 10_000,
                 stop_on_error: bool = True, gates_locks: bool = False) -> None:
        self.max_steps = max_steps
        self.stop_on_error = stop_on_error
        self.gates_locks = gates_locks
        self.driver = greenlet.getcurrent()
        self.aborting = False
        #: the steps run so far
        self.schedule: list[Step] = []
        #: the thread that ran the last step
        self.last: str | None = None
        self.threads: dict[str, T] = {}
        base = contextvars.copy_context()
        for name, fn in threads.items():
            if not name or any(c.isspace() for c in name) or name == sync.MAIN_THREAD:
                raise ValueError(f"bad thread name {name!r}")
            glet = greenlet.greenlet(parent=self.driver)
            thread: Any = self.thread_class(name, self, glet)
            glet.run = self._body(thread, fn)
            context = base.copy()
            context.run(sync.set_hook, thread)
            glet.gr_context = context
            self.threads[name] = thread

    # --- for subclasses -----------------------------------------------------------------

    def announce(self, obj: Hashable | None, write: bool) -> Any:
        """A thread's next step will make the access ``obj``/``write`` declare; what this
        returns is kept as the thread's ``footprint`` (the explorer's use)."""
        return None

    def advance(self, depth: int, name: str) -> bool:
        """Run step ``depth`` by thread ``name``; True stops the run."""
        self.run_step(name)
        return self.stop_on_error and self.threads[name].error is not None

    # --- driving ------------------------------------------------------------------------

    def enabled(self) -> list[str]:
        out = []
        for thread in self.threads.values():
            status = thread.status
            if status is ThreadStatus.READY:
                if thread.gate is None or thread.gate():
                    out.append(thread.name)
            elif status is ThreadStatus.BLOCKED:
                assert thread.ready is not None
                if thread.ready():
                    out.append(thread.name)
        return out

    def run_step(self, name: str) -> None:
        """Run thread ``name`` (enabled) until it yields, blocks or ends."""
        thread = self.threads[name]
        self.schedule.append((name, thread.label))
        if thread.status is ThreadStatus.BLOCKED:
            thread.status = ThreadStatus.READY
            thread.ready = None
        self.last = name
        thread.glet.switch()

    def begin_step(self, thread: T) -> None:
        """Record the step ``thread`` starts (as :meth:`run_step` does): it joins
        ``schedule`` with the thread's label, and a blocked thread is resumed."""
        self.schedule.append((thread.name, thread.label))
        if thread.status is ThreadStatus.BLOCKED:
            thread.status = ThreadStatus.READY
            thread.ready = None
        self.last = thread.name

    def fast_forward(self, names: Sequence[str]) -> None:
        """Run the steps ``names`` one after the other with no chooser, no ``advance``
        and no check of who is enabled: a prefix already run, with these choices, by an
        earlier run of the same deterministic program (the explorer replays the common
        prefix of its schedules so).  Each must be enabled and end without error there.
        Steps are recorded by :meth:`begin_step`; consecutive steps of one thread run
        without switching back here in between.  Raises ScheduleMismatch when a thread
        blocks or ends before its steps are done (the program is not the one recorded)."""
        threads = self.threads
        i, count = 0, len(names)
        while i < count:
            name = names[i]
            j = i + 1
            while j < count and names[j] == name:
                j += 1
            thread = threads[name]
            self.begin_step(thread)
            thread.run_on = j - i - 1
            thread.glet.switch()
            if thread.run_on:
                raise ScheduleMismatch(
                    f"step {j - thread.run_on + 1}: {name} stopped before the replayed "
                    "prefix says")
            i = j

    def run(self, chooser: Chooser[Self], depth: int = 0) -> Stop:
        """Step threads along ``chooser`` until the run ends; the threads stay as they
        are (call :meth:`teardown` to unwind the suspended ones).  ``depth``: steps
        already run (:meth:`fast_forward`)."""
        while True:
            enabled = self.enabled()
            if not enabled:
                return Stop.IDLE
            if depth >= self.max_steps:
                return Stop.BUDGET
            name = chooser.choose(self, depth, enabled)
            if name is None:
                return Stop.CUT
            if self.advance(depth, name):
                return Stop.STOPPED
            depth += 1

    def finished(self) -> bool:
        return all(t.status is ThreadStatus.DONE for t in self.threads.values())

    def stuck(self) -> list[str]:
        """Threads that did not run to their end (blocked, out of budget, torn down)."""
        return [t.name for t in self.threads.values()
                if t.status is not ThreadStatus.DONE or t.aborted]

    def teardown(self) -> None:
        """Unwind every suspended thread so no greenlet outlives the run."""
        self.aborting = True
        for thread in self.threads.values():
            if thread.status is not ThreadStatus.DONE and thread.glet:
                thread.glet.throw(Abort)

    def _body(self, thread: ModelThread, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                thread.result = fn()
            except Abort:
                thread.aborted = True
            except Exception as exc:  # the thread's outcome, reported through ``error``
                thread.error = exc
            finally:
                thread.status = ThreadStatus.DONE
                thread.label = DONE_LABEL

        return run


# --- choosers ---------------------------------------------------------------------------


class RandomChooser:
    """Seeded uniform choice among the enabled threads (the same seed, the same run)."""

    def __init__(self, seed: int | random.Random = 0) -> None:
        self.rng = seed if isinstance(seed, random.Random) else random.Random(seed)

    def choose(self, sched: Scheduler[Any], depth: int, enabled: list[str]) -> str | None:
        return self.rng.choice(enabled)


class Replay:
    """Follows a recorded schedule exactly; raises ScheduleMismatch when the run diverges
    (a thread that cannot run, or one paused at another label than recorded)."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)

    def choose(self, sched: Scheduler[Any], depth: int, enabled: list[str]) -> str | None:
        if depth >= len(self.steps):
            raise ScheduleMismatch(f"the run goes on after the {len(self.steps)} recorded steps")
        name, label = self.steps[depth]
        thread = sched.threads.get(name)
        if thread is None or name not in enabled:
            raise ScheduleMismatch(f"step {depth + 1}: thread {name!r} cannot run here")
        if thread.label != label:
            raise ScheduleMismatch(
                f"step {depth + 1}: {name} is at {thread.label!r}, the script says {label!r}"
            )
        return name


class Scripted:
    """A preference list: at each step the first enabled name of ``order`` (names are
    consumed as they are tried); once it is used up, ``then`` picks (default: the first
    enabled thread)."""

    def __init__(self, order: Sequence[str],
                 then: Callable[[int, list[str]], str] | None = None) -> None:
        self.pending = list(order)
        self.then = then

    def choose(self, sched: Scheduler[Any], depth: int, enabled: list[str]) -> str | None:
        while self.pending:
            want = self.pending.pop(0)
            if want in enabled:
                return want
        return self.then(depth, enabled) if self.then is not None else enabled[0]


# --- the common case ------------------------------------------------------------------


def run_random(threads: Mapping[str, Callable[[], Any]], seed: int = 0, *,
               max_steps: int = 100_000) -> Scheduler[ModelThread]:
    """Run ``threads`` to the end under seeded random schedule ``seed``.

    Stops at the first HazardError a thread raises (see :func:`hazard`); any other
    exception a thread raises is re-raised here.  Threads still blocked at the end (or
    when the step budget ran out) are in ``stuck()``.
    """
    sched: Scheduler[ModelThread] = Scheduler(threads, max_steps=max_steps)
    try:
        sched.run(RandomChooser(seed))
    finally:
        sched.teardown()
    for thread in sched.threads.values():
        if thread.error is not None and not isinstance(thread.error, HazardError):
            raise thread.error
    return sched


def hazard(sched: Scheduler[Any]) -> str | None:
    """The first hazard a thread raised, as ``"hazard: message"``, or None."""
    for thread in sched.threads.values():
        if isinstance(thread.error, HazardError):
            name = type(thread.error).__dict__.get("hazard", "hazard")
            return f"{name}: {thread.error}"
    return None
