"""Source-DPOR with sleep sets over the engine's depth-first search.

:class:`Dpor` explores one run per node at first and adds backtrack choices only where
the run it just finished has a race (see its docstring); :func:`search` picks the search
a :class:`~vmferry.analysis.explore.engine.SearchLimits` asks for.
"""

from __future__ import annotations

from collections.abc import Callable

from vmferry.analysis.explore.api import Instance
from vmferry.analysis.explore.engine import (
    Dfs,
    Execution,
    Footprint,
    Node,
    SearchLimits,
    SearchStats,
)


class Dpor(Dfs):
    """Source-DPOR with sleep sets (Abdulla, Aronis, Jonsson, Sagonas, POPL 2014).

    Each run starts with one choice per node (the running thread if it may continue,
    else the first enabled one).  After the run, every *race* -- a pair of dependent
    steps ``e`` < ``e'`` of different threads with no third step ordered between them by
    happens-before -- is reversed: some thread among the *initials* of ``notdep(e).e'``
    (the steps after ``e`` that do not happen after it, then ``e'``) is added to the
    backtrack set of the node before ``e``, unless one of them is already there, already
    explored, or asleep.  Happens-before comes from program order plus dependent
    footprints, with vector clocks; only steps at or past the node where the run
    diverged from the previous one are looked at (earlier races were handled then).

    A thread that is not enabled at the node before ``e`` (it was blocked) cannot be
    scheduled there: every enabled thread is added instead, as classic DPOR does.

    With a preemption bound, a backtrack choice over the bound is not taken; as in
    bounded POR (Coons, Musuvathi, McKinley, OOPSLA 2013) the racing thread is also added
    at the last context switch before ``e``, where running it costs no extra preemption.
    Bounded DPOR is not complete in general (a schedule within the bound may only be
    reachable through one over it); the module's tests compare it with naive enumeration.
    State hashing is not used: pruning a revisited state would drop the races of the
    subtree explored from it the first time.
    """

    def __init__(self, factory: Callable[[], Instance], limits: SearchLimits) -> None:
        super().__init__(factory, limits)
        self.diverge = 0
        self.names: list[str] = []
        self.tindex: dict[str, int] = {}
        #: (thread, footprint) of the steps observed after a failure ended the run
        self.pending: list[tuple[str, Footprint]] = []
        #: each enabled thread's next step when a failure ended the run
        self.next_steps: list[tuple[str, Footprint]] = []
        #: steps of the run that are nodes of the tree (the rest were observed)
        self.real = 0
        self.thr: list[int] = []
        self.clocks: list[list[int]] = []
        self.pos: list[int] = []
        self.before: list[tuple[int, ...]] = []
        self.last_of: list[int] = []
        self.last_write: dict[int, int] = {}
        self.reads: dict[int, list[int]] = {}
        self.last_all = -1

    def choose(self, execution: Execution, depth: int, enabled: list[str]) -> str | None:
        if not self.names:
            self.names = list(execution.threads)
            self.tindex = {name: i for i, name in enumerate(self.names)}
        return super().choose(execution, depth, enabled)

    def _new_node(self, execution: Execution, depth: int, enabled: list[str]) -> Node | None:
        sleep = self._inherited_sleep(depth)
        last = execution.last
        node = Node(sleep, [], self._preemptions_at(depth), last, last in enabled,
                     enabled=tuple(enabled))
        todo = self._order(node, enabled)
        if not todo:
            return None
        node.chosen = todo[0]
        return node

    def _backtrack(self) -> bool:
        found = super()._backtrack()
        self.diverge = len(self.stack) - 1
        return found

    def failed(self, execution: Execution) -> None:
        """The run ended with a failure: run the other threads on, for their races.

        Source-DPOR reverses races between the steps of a run; a run cut short by a
        failure never executes the steps after it, so their races with the trace -- and
        failures of other kinds behind them -- would be lost.  The threads still able to
        run are stepped on to the end (no checks, the running thread first); those steps
        are only *observed*: their races add backtrack choices at the nodes before the
        failure, never after it.
        """
        self.next_steps = [
            (name, execution.threads[name].footprint) for name in execution.enabled()
        ]
        pending: list[tuple[str, Footprint]] = []
        last = execution.last
        while len(execution.schedule) < execution.max_steps:
            enabled = execution.enabled()
            if not enabled:
                break
            name = last if last in enabled else enabled[0]
            footprint, _ = execution.step(name)
            pending.append((name, footprint))
            last = name
        self.pending = pending

    def _after_run(self) -> None:
        stack = self.stack
        n = len(stack)
        width = len(self.names)
        self.thr = thr = [self.tindex[node.chosen] for node in stack]
        self.clocks = []
        self.pos = pos = [0] * n
        self.before = before = []
        count = [0] * width
        self.last_of = [-1] * width
        self.last_write = {}
        self.reads = {}
        self.last_all = -1
        self.real = n
        pending, self.pending = self.pending, []
        steps = [stack[j].explored[stack[j].chosen] for j in range(n)]
        for name, footprint in pending:  # steps observed after a failure
            thr.append(self.tindex[name])
            pos.append(0)
            steps.append(footprint)
        for j, fp in enumerate(steps):
            p = thr[j]
            before.append(tuple(count))
            prev, deps, clock = self._clock(p, fp)
            count[p] += 1
            clock[p] = pos[j] = count[p]
            self.clocks.append(clock)
            if j >= self.diverge:
                self._races(j, p, prev, deps)
            self._record(j, p, fp)
            if j == n - 1 and self.next_steps:
                self._next_steps(count)

    def _next_steps(self, count: list[int]) -> None:
        """Races of each thread's next step at the failure, as if it ran right then."""
        thr, pos, clocks = self.thr, self.pos, self.clocks
        j = self.real
        for name, fp in self.next_steps:
            p = self.tindex[name]
            prev, deps, clock = self._clock(p, fp)
            clock[p] = count[p] + 1
            thr.insert(j, p)
            clocks.insert(j, clock)
            pos.insert(j, count[p] + 1)
            self._races(j, p, prev, deps)
            del thr[j], clocks[j], pos[j]
        self.next_steps = []

    def _clock(self, p: int, fp: Footprint) -> tuple[list[int], list[int], list[int]]:
        """Thread ``p``'s previous clock, the steps a step ``fp`` of ``p`` depends on
        directly, and its clock (own entry not yet set)."""
        clocks, last_of = self.clocks, self.last_of
        prev = clocks[last_of[p]] if last_of[p] >= 0 else [0] * len(self.names)
        deps: list[int] = []
        if fp.everything:
            deps = [e for e in last_of if e >= 0]
        else:
            if self.last_all >= 0:
                deps.append(self.last_all)
            for o in fp.reads:
                w = self.last_write.get(o)
                if w is not None:
                    deps.append(w)
            for o in fp.writes:
                w = self.last_write.get(o)
                if w is not None:
                    deps.append(w)
                deps.extend(self.reads.get(o, ()))
        clock = list(prev)
        for i in deps:
            other = clocks[i]
            for r in range(len(clock)):
                if other[r] > clock[r]:
                    clock[r] = other[r]
        return prev, deps, clock

    def _races(self, j: int, p: int, prev: list[int], deps: list[int]) -> None:
        thr, clocks, pos = self.thr, self.clocks, self.pos
        races = {i for i in deps if thr[i] != p and prev[thr[i]] < pos[i] and i < self.real}
        if len(races) > 1:
            races = {i for i in races if not any(
                k != i and clocks[k][thr[i]] >= pos[i] for k in races)}
        for i in sorted(races):
            self._reverse(i, j, thr, clocks, pos, self.before)

    def _record(self, j: int, p: int, fp: Footprint) -> None:
        if fp.everything:
            self.last_all = j
            self.last_write.clear()
            self.reads.clear()
        else:
            for o in fp.writes:
                self.last_write[o] = j
                self.reads[o] = []
            for o in fp.reads - fp.writes:
                self.reads.setdefault(o, []).append(j)
        self.last_of[p] = j

    def _reverse(self, i: int, j: int, thr: list[int], clocks: list[list[int]],
                 pos: list[int], before: list[tuple[int, ...]]) -> None:
        """Make sure some initial of ``notdep(i).j`` is explored at the node before ``i``."""
        t, p, base, width = thr[i], thr[j], before[i], len(self.names)
        initials: list[str] = []
        seen: set[int] = set()
        for k in range(i + 1, j):
            clock = clocks[k]
            if clock[t] >= pos[i]:
                continue  # happens after i: not in notdep(i)
            q = thr[k]
            if q in seen:
                continue
            seen.add(q)
            if all(clock[r] <= base[r] for r in range(width) if r != q):
                initials.append(self.names[q])
        if p not in seen:
            clock = clocks[j]
            if all(clock[r] <= base[r] for r in range(width) if r not in (p, t)):
                initials.append(self.names[p])
        self._add_backtrack(i, initials)
        if self.limits.preemption_bound is not None:
            k = i - 1
            while k > 0 and thr[k - 1] == thr[k]:
                k -= 1
            if k >= 0 and thr[k] != p:
                self._add_backtrack(k, [self.names[p]], fallback=False)

    def _add_backtrack(self, depth: int, initials: list[str], *, fallback: bool = True) -> None:
        node = self.stack[depth]
        if any(q in node.explored or q in node.todo or q in node.sleep for q in initials):
            return
        allowed = self._order(node, list(node.enabled))
        fresh = [q for q in allowed if q not in node.explored and q not in node.todo]
        pick = [q for q in fresh if q in initials]
        if pick:
            node.todo.append(pick[0])
        elif fallback and not any(q in node.enabled for q in initials):
            node.todo.extend(fresh)


def search(factory: Callable[[], Instance], limits: SearchLimits,
           progress: Callable[[SearchStats], None] | None = None) -> SearchStats:
    """Exhaustive bounded search (see the engine's docstring).  ``progress`` is called
    with the running statistics after every run."""
    if limits.reduction == "dpor" and limits.por:
        engine: Dfs = Dpor(factory, limits)
    else:
        if limits.reduction == "none":
            limits.por = limits.state_hashing = False
        engine = Dfs(factory, limits)
    engine.stats.on_record = progress
    stats = engine.run()
    stats.on_record = None
    return stats
