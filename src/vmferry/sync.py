"""Yield points and model locks: the seam between concurrent models and the explorer.

Theory of operation
-------------------
Models of concurrent kernel paths (the IOMMU probe, the TCE hypercalls, the LPM update
handler, VFIO data streams) are ordinary Python.  Wherever real code would touch state
another thread can see, the model calls :func:`yield_point`; wherever it takes a lock, it
uses a :class:`ModelLock`.

Outside the explorer no scheduler is installed: ``yield_point`` costs one global lookup and
returns, and a ``ModelLock`` is a plain owner flag that reports self-deadlock (taking a lock
the single thread already holds) as :class:`~vmferry.errors.Deadlock` instead of hanging.

Under the explorer (``vmferry.analysis.explore``) a :class:`SchedulerHook` is installed with
:func:`scheduled`.  Each model thread then runs on its own greenlet; ``yield_point`` hands
control back to the scheduler, which decides who runs next, and ``ModelLock.acquire``
blocks the calling thread until the lock is free.

Declaring accesses
------------------
The ``obj``/``write`` arguments of ``yield_point`` declare the shared access the step
starting there makes, for the explorer's partial-order reduction (sleep sets, DPOR): two
steps that touch different objects, or only read the same one, commute.  ``obj`` is any
hashable naming the object (a lock, a model object, ``("dev", "D")``); several objects are
declared with :class:`Accesses`, and ``LOCAL`` declares a step that touches nothing
shared.  A yield point that declares nothing (``obj=None``)
conflicts with everything, so leaving a declaration out costs reduction, never soundness.
``wait_until`` takes the same declaration for the step that resumes the waiting thread
(``ModelLock`` declares its own lock); without one, a resumption conflicts with everything.
The declaration covers what the thread does from the yield point up to its next yield
point or wait.

This module sits beside :mod:`vmferry.errors` at the bottom of the layer stack so that
``hw`` models may import it; it imports nothing else from vmferry.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import greenlet

from vmferry.errors import Deadlock, HazardError, InvariantViolation

MAIN_THREAD = "main"


class SchedulerHook(Protocol):
    """What an installed scheduler provides to model code."""

    def yield_point(self, label: str, obj: Hashable | None, write: bool) -> None:
        """A shared access is about to happen; the scheduler may switch threads here."""

    def wait(self, label: str, ready: Callable[[], bool]) -> None:
        """Block the calling model thread until ``ready()`` is true."""

    def current_thread(self) -> str:
        """Name of the model thread that is running."""


class AccessHook(SchedulerHook, Protocol):
    """A scheduler that also takes the access declared for a resumption (the explorer)."""

    def wait_access(
        self, label: str, ready: Callable[[], bool], obj: Hashable | None, write: bool
    ) -> None:
        """As ``wait``; the resumed step makes the declared access."""

    def acquire_point(self, label: str, lock: ModelLock) -> None:
        """A yield point whose step takes ``lock``: not enabled while another holds it."""


class Accesses:
    """Several objects touched by one step: ``Accesses(reads=(a,), writes=(b, c))``.

    ``Accesses()`` (also :data:`LOCAL`) declares a step that touches no shared state.
    """

    __slots__ = ("reads", "writes")

    def __init__(self, *, reads: tuple[Hashable, ...] = (), writes: tuple[Hashable, ...] = ()):
        self.reads = tuple(reads)
        self.writes = tuple(writes)

    def __repr__(self) -> str:
        return f"Accesses(reads={self.reads!r}, writes={self.writes!r})"


LOCAL = Accesses()
"""The access of a step that touches no shared state (commutes with every other step)."""

_hook: SchedulerHook | None = None


@contextmanager
def scheduled(hook: SchedulerHook) -> Iterator[SchedulerHook]:
    """Install ``hook`` for the duration of the block (not re-entrant)."""
    global _hook
    if _hook is not None:
        raise RuntimeError("a scheduler is already installed")
    _hook = hook
    try:
        yield hook
    finally:
        _hook = None


def yield_point(label: str, obj: Hashable | None = None, *, write: bool = True) -> None:
    """Mark a shared-state access.  ``obj`` names what is touched; ``write`` how."""
    hook = _hook
    if hook is not None:
        hook.yield_point(label, obj, write)


def wait_until(
    label: str, ready: Callable[[], bool], obj: Hashable | None = None, *, write: bool = True
) -> None:
    """Block until ``ready()``; without a scheduler, a false condition is a deadlock.

    ``obj``/``write`` declare the access of the step that resumes the thread (what
    ``ready`` reads and what the thread touches before its next yield point).
    """
    hook = _hook
    if hook is not None:
        wait_access = getattr(hook, "wait_access", None) if obj is not None else None
        if wait_access is not None:  # an AccessHook
            wait_access(label, ready, obj, write)
        else:
            hook.wait(label, ready)
    elif not ready():
        raise Deadlock(f"{label}: would block forever (single thread, no scheduler)")


def current_thread() -> str:
    hook = _hook
    return hook.current_thread() if hook is not None else MAIN_THREAD


class ModelLock:
    """A non-recursive mutex for models (a kernel ``struct mutex``).

    Invariant: ``owner`` is the name of the model thread holding the lock, or None.
    """

    __slots__ = ("name", "owner")

    def __init__(self, name: str) -> None:
        self.name = name
        self.owner: str | None = None

    def acquire(self) -> None:
        me = current_thread()
        hook = _hook
        gate = getattr(hook, "acquire_point", None) if hook is not None else None
        if gate is not None:  # an AccessHook: the step is enabled only when the lock is free
            gate(f"lock {self.name}", self)
        else:
            yield_point(f"lock {self.name}", self, write=True)
        if self.owner == me:
            raise Deadlock(f"{me} takes {self.name} which it already holds")
        wait_until(f"lock {self.name}", lambda: self.owner is None, self, write=True)
        self.owner = me

    def release(self) -> None:
        me = current_thread()
        if self.owner != me:
            raise InvariantViolation(f"{me} releases {self.name} held by {self.owner}")
        self.owner = None
        # The release belongs to the step that ran up to here: the explorer sees the owner
        # change and adds the lock to that step's footprint.  The step starting at this
        # yield point runs the caller's code after the release, up to its next yield
        # point: that code must touch nothing shared (or yield first).  It is declared as
        # writing the lock so that it is ordered against another thread's acquire: that
        # race is the one DPOR reverses to let a waiter take the lock right after the
        # release (here the waiter is enabled; before the release it is not).
        yield_point(f"unlock {self.name}", self, write=True)

    @property
    def locked(self) -> bool:
        return self.owner is not None

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ModelLock({self.name!r}, owner={self.owner!r})"


class RandomScheduler:
    """Runs model threads concurrently on greenlets under a seeded random schedule.

    The simple scheduler models use at run time (a boot probing its IOMMUs, stop_machine
    running a join on every CPU); the explorer in ``vmferry.analysis.explore`` is the one
    that enumerates schedules.  The same seed gives the same run.  A thread's return value
    lands in ``results``; the first HazardError stops the run and :meth:`run` returns it as
    ``"hazard: message"``; threads still blocked at the end are in :meth:`stuck`.
    """

    def __init__(self, threads: Mapping[str, Callable[[], Any]], seed: int = 0, *,
                 max_steps: int = 100_000) -> None:
        self.rng = random.Random(seed)
        self.max_steps = max_steps
        self.main = greenlet.getcurrent()
        self.results: dict[str, Any] = {}
        self.waiting: dict[str, Callable[[], bool]] = {}
        self.done: set[str] = set()
        self.steps = 0
        self.error: BaseException | None = None
        self.names: dict[Any, str] = {}
        self.glets: dict[str, Any] = {}
        for name, fn in threads.items():
            glet = greenlet.greenlet(self._body(name, fn), parent=self.main)
            self.glets[name] = glet
            self.names[glet] = name

    def _body(self, name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                self.results[name] = fn()
            except HazardError as exc:
                self.error = exc
            finally:
                self.done.add(name)

        return run

    def yield_point(self, label: str, obj: Hashable | None, write: bool) -> None:
        if greenlet.getcurrent() in self.names:
            self.main.switch()

    def wait(self, label: str, ready: Callable[[], bool]) -> None:
        me = self.names.get(greenlet.getcurrent())
        while not ready():
            if me is None:
                return
            self.waiting[me] = ready
            self.main.switch()
        if me is not None:
            self.waiting.pop(me, None)

    def current_thread(self) -> str:
        return self.names.get(greenlet.getcurrent(), MAIN_THREAD)

    def run(self) -> str | None:
        with scheduled(self):
            while self.error is None and self.steps < self.max_steps:
                runnable = [n for n in self.glets if n not in self.done and self._ready(n)]
                if not runnable:
                    break
                self.steps += 1
                self.glets[self.rng.choice(runnable)].switch()
        if self.error is not None:
            return f"{type(self.error).__dict__.get('hazard', 'hazard')}: {self.error}"
        return None

    def _ready(self, name: str) -> bool:
        ready = self.waiting.get(name)
        return ready is None or ready()

    def stuck(self) -> list[str]:
        return [n for n in self.glets if n not in self.done]
