"""Yield points and model locks: the seam between concurrent models and the explorer.

Theory of operation
-------------------
Models of concurrent kernel paths (the IOMMU probe, the TCE hypercalls, the LPM update
handler, VFIO data streams) are ordinary Python.  Wherever real code would touch state
another thread can see, the model calls :func:`yield_point`; wherever it takes a lock, it
uses a :class:`ModelLock`.

Outside a scheduler no hook is set: ``yield_point`` costs one context-variable lookup
and returns, and a ``ModelLock`` is a plain owner flag that reports self-deadlock (taking a
lock the single thread already holds) as :class:`~vmferry.errors.Deadlock` instead of
hanging.

Under the scheduler core (:mod:`vmferry.sched`: the explorer, the seeded random runs of
the models, the test drivers) each model thread runs on its own greenlet, and the
greenlet's contextvars context holds that thread's :class:`SchedulerHook`.  The hook is
per context, not process-wide: ``yield_point`` hands control back to the scheduler that
owns the calling greenlet, and only to it, and ``ModelLock.acquire`` blocks the calling
thread until the lock is free.  Code that runs outside a model thread sees no hook.

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

from collections.abc import Callable, Hashable
from contextvars import ContextVar, Token
from typing import Protocol

from vmferry.errors import Deadlock, InvariantViolation

MAIN_THREAD = "main"


class SchedulerHook(Protocol):
    """What a scheduler provides to the model thread running in a context."""

    @property
    def name(self) -> str:
        """Name of the model thread."""

    def yield_point(self, label: str, obj: Hashable | None, write: bool) -> None:
        """A shared access is about to happen; the scheduler may switch threads here."""

    def wait(self, label: str, ready: Callable[[], bool], obj: Hashable | None,
             write: bool) -> None:
        """Block the thread until ``ready()`` is true; the step that resumes it makes the
        access ``obj``/``write`` declare (``obj=None``: unknown, conflicts with all)."""

    def acquire_point(self, label: str, lock: ModelLock) -> None:
        """A yield point whose step takes ``lock`` (a scheduler may hold the thread back
        while another thread holds the lock)."""


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

_hook: ContextVar[SchedulerHook | None] = ContextVar("vmferry_scheduler_hook", default=None)


def set_hook(hook: SchedulerHook | None) -> Token[SchedulerHook | None]:
    """Hold ``hook`` in the current context (the scheduler core does this in each model
    thread's own context); returns the token to undo it with :func:`reset_hook`."""
    return _hook.set(hook)


def reset_hook(token: Token[SchedulerHook | None]) -> None:
    _hook.reset(token)


def current_hook() -> SchedulerHook | None:
    """The hook held in the current context, or None outside a model thread."""
    return _hook.get()


def yield_point(label: str, obj: Hashable | None = None, *, write: bool = True) -> None:
    """Mark a shared-state access.  ``obj`` names what is touched; ``write`` how."""
    hook = _hook.get()
    if hook is not None:
        hook.yield_point(label, obj, write)


def wait_until(
    label: str, ready: Callable[[], bool], obj: Hashable | None = None, *, write: bool = True
) -> None:
    """Block until ``ready()``; without a scheduler, a false condition is a deadlock.

    ``obj``/``write`` declare the access of the step that resumes the thread (what
    ``ready`` reads and what the thread touches before its next yield point).
    """
    hook = _hook.get()
    if hook is not None:
        hook.wait(label, ready, obj, write)
    elif not ready():
        raise Deadlock(f"{label}: would block forever (single thread, no scheduler)")


def current_thread() -> str:
    hook = _hook.get()
    return hook.name if hook is not None else MAIN_THREAD


class ModelLock:
    """A non-recursive mutex for models (a kernel ``struct mutex``).

    Invariant: ``owner`` is the name of the model thread holding the lock, or None.
    """

    __slots__ = ("name", "owner")

    def __init__(self, name: str) -> None:
        self.name = name
        self.owner: str | None = None

    def acquire(self) -> None:
        hook = _hook.get()
        me = MAIN_THREAD
        if hook is not None:
            me = hook.name
            hook.acquire_point(f"lock {self.name}", self)
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
