"""A debug check of the accesses models declare at their yield points.

Partial-order reduction (sleep sets, DPOR) is only sound when every shared access a step
makes is covered by the declaration of the yield point it starts at.  An undeclared
access does not show up anywhere by itself; this check finds it by its effect: two
steps of different threads that the declarations call independent must commute.  Along
seeded random runs of an instance, at every node each step taken is paired with the
pending step of every other enabled thread it is declared independent of, and both are
run in both orders (the prefix
re-executed) and the result compared: the shared state (``Instance.state()``), every
thread's control path, status and the locals of its suspended frames, and the error, if
any, the steps raised.  A difference means the two steps conflict on something neither
declares; the pair's labels say where to look.

With ``lock_aware`` (what ``--strategy dpor`` relies on: it orders two steps only by the
data they touch, never by a lock alone) pairs whose only common object is a lock are
checked too, wherever both orders can run (a thread's acquisition is not enabled while
the other holds the lock, so such a pair is skipped): their two orders must give the same
state, as two steps touching different data do.

    from vmferry.analysis.explore.audit import audit_declarations
    assert audit_declarations(lambda: build("v6_15"), runs=20) == []
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from vmferry.analysis.explore.api import Instance
from vmferry.analysis.explore.engine import Execution, Footprint, run_once


@dataclass(frozen=True)
class Undeclared:
    """Two steps declared independent that do not commute."""

    first: tuple[str, str]
    second: tuple[str, str]
    #: the choices (thread names) leading to the first of the two steps
    prefix: tuple[str, ...]

    def __str__(self) -> str:
        (t1, l1), (t2, l2) = self.first, self.second
        return f"{t1} {l1!r} and {t2} {l2!r} are declared independent but do not commute"


class _Recorder:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.choices: list[str] = []
        self.enabled: list[tuple[str, ...]] = []
        self.labels: list[tuple[str, str]] = []
        self.footprints: list[Footprint] = []
        #: at each node, every enabled thread's pending (label, footprint)
        self.pending: list[dict[str, tuple[tuple[str, str], Footprint]]] = []
        self.execution: Execution | None = None

    def locks(self) -> frozenset[int]:
        execution = self.execution
        if execution is None:
            return frozenset()
        return frozenset(execution.canon[lock] for lock in execution.locks)

    def choose(self, execution: Execution, depth: int, enabled: list[str]) -> str | None:
        self.execution = execution
        name = self.rng.choice(enabled)
        self.choices.append(name)
        self.enabled.append(tuple(enabled))
        self.labels.append((name, execution.threads[name].label))
        self.pending.append({
            t: ((t, execution.threads[t].label), execution.threads[t].footprint)
            for t in enabled
        })
        return name

    def replayed(self) -> Sequence[str]:
        return ()

    def stepped(self, depth: int, name: str, footprint: Footprint) -> None:
        self.footprints.append(footprint)


class _Probe:
    """Follows ``choices`` and records the state key right after the last of them."""

    def __init__(self, choices: list[str]) -> None:
        self.choices = choices
        self.key: Hashable = None
        self.execution: Execution | None = None

    def choose(self, execution: Execution, depth: int, enabled: list[str]) -> str | None:
        self.execution = execution
        if depth == len(self.choices):
            return None
        name = self.choices[depth]
        if name not in enabled:
            self.key = ("not enabled", depth, name)
            return None
        return name

    def replayed(self) -> Sequence[str]:
        return ()

    def stepped(self, depth: int, name: str, footprint: Footprint) -> None:
        if depth == len(self.choices) - 1 and self.execution is not None:
            self.key = _key(self.execution)


def _key(execution: Execution) -> Hashable:
    key = execution.state_key()
    return key[:2] if isinstance(key, tuple) else key


def _without(fp: Footprint, locks: frozenset[int]) -> Footprint:
    if fp.everything:
        return fp
    return Footprint(fp.reads - locks, fp.writes - locks)


def _not_enabled(key: Hashable) -> bool:
    return isinstance(key, tuple) and key[:1] == ("not enabled",)


def _after(factory: Callable[[], Instance], choices: list[str], max_steps: int) -> Hashable:
    probe = _Probe(choices)
    outcome = run_once(factory, max_steps, probe)
    if outcome is not None and outcome.error is not None:
        # the same error from the same thread, whichever of the two steps ran first
        return ("failed", type(outcome.error).__name__, outcome.thread)
    return probe.key


def audit_declarations(
    factory: Callable[[], Instance], *, runs: int = 10, seed: int = 0, max_steps: int = 10_000,
    lock_aware: bool = True,
) -> list[Undeclared]:
    """Pairs of adjacent steps declared independent whose two orders differ.

    The instance must provide ``state()``.  Each distinct pair of labels is reported once.
    """
    found: dict[tuple[tuple[str, str], tuple[str, str]], Undeclared] = {}
    for run in range(runs):
        rec = _Recorder(random.Random(seed + run))
        run_once(factory, max_steps, rec)
        if factory().state is None:
            raise ValueError("audit_declarations needs an instance with state()")
        steps = min(len(rec.footprints), len(rec.choices))
        locks = rec.locks() if lock_aware else frozenset()
        for i in range(steps):
            a = rec.choices[i]
            for b, (label, pending) in rec.pending[i].items():
                if b == a:
                    continue
                by_lock = False
                if rec.footprints[i].dependent(pending):
                    if not locks or _without(rec.footprints[i], locks).dependent(
                            _without(pending, locks)):
                        continue
                    by_lock = True  # ordered by a lock alone
                pair = (rec.labels[i], label)
                if pair in found or (pair[1], pair[0]) in found:
                    continue
                prefix = rec.choices[:i]
                here = _after(factory, [*prefix, a, b], max_steps)
                swapped = _after(factory, [*prefix, b, a], max_steps)
                if by_lock and (_not_enabled(here) or _not_enabled(swapped)):
                    continue
                if here != swapped:
                    found[pair] = Undeclared(pair[0], pair[1], tuple(prefix))
    return list(found.values())
