"""Source-DPOR with sleep sets over the engine's depth-first search.

:class:`Dpor` explores one run per node at first and adds backtrack choices only where
the run it just finished has a race (see its docstring); :func:`search` picks the search
a :class:`~vmferry.analysis.explore.engine.SearchLimits` asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace

from vmferry.analysis.explore.api import Instance
from vmferry.analysis.explore.engine import (
    EVERYTHING,
    Dfs,
    Execution,
    Footprint,
    Node,
    SearchLimits,
    SearchStats,
    run_once,
)
from vmferry.sync import ModelLock


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
        #: lock-aware races (see :meth:`_lock_point`); False orders every two critical
        #: sections on one lock, as plain source-DPOR does
        self.lock_aware = limits.lock_aware
        self.execution: Execution | None = None
        #: the locks held (canonical number -> owner) after each step of the run
        self.held: list[dict[int, str]] = []
        self.pending_held: list[dict[int, str]] = []
        #: canonical numbers of the run's locks
        self.lock_nums: frozenset[int] = frozenset()
        self.steps: list[Footprint] = []
        #: the footprint of the next step :meth:`_next_steps` is looking at
        self.hypothetical: Footprint | None = None
        #: stateful search: prune a node whose state was explored before (see
        #: :meth:`_new_node`); ``keys`` holds the state key of each node on the stack
        self.stateful = limits.state_hashing
        self.keys: list[Hashable] = []
        #: every step (thread, footprint by object) run in the subtree below a state
        self.summaries: dict[Hashable, set[tuple[str, StableStep]]] = {}
        #: the summary of the state where this run was pruned, if it was
        self.cut: set[tuple[str, StableStep]] | None = None

    def choose(self, execution: Execution, depth: int, enabled: list[str]) -> str | None:
        if not self.names:
            self.names = list(execution.threads)
            self.tindex = {name: i for i, name in enumerate(self.names)}
        self.execution = execution
        return super().choose(execution, depth, enabled)

    def stepped(self, depth: int, name: str, footprint: Footprint) -> None:
        super().stepped(depth, name, footprint)
        if self.lock_aware:
            del self.held[depth:]
            self.held.append(self._owners())

    def _owners(self) -> dict[int, str]:
        execution = self.execution
        assert execution is not None
        return {execution.canon[lock]: lock.owner for lock in execution.locks
                if lock.owner is not None}

    def _new_node(self, execution: Execution, depth: int, enabled: list[str]) -> Node | None:
        """A new node, or None when every choice is asleep or over the bound, or (stateful)
        when its state was explored before with no more preemptions and no larger sleep
        set: the run ends there, and every step of the subtree explored below that state
        the first time is checked for races with this run's steps as if it ran next."""
        sleep = self._inherited_sleep(depth)
        preemptions = self._preemptions_at(depth)
        key: Hashable = None
        if self.stateful:
            key = execution.state_key()
            if key is not None:
                asleep = frozenset(sleep)
                visits = self.seen.setdefault(key, [])
                if any(pre <= preemptions and slept <= asleep for pre, slept in visits):
                    self.stats.pruned_by_state += 1
                    self.cut = self.summaries.setdefault(key, set())
                    return None
                visits.append((preemptions, asleep))
        last = execution.last
        node = Node(sleep, [], preemptions, last, last in enabled, enabled=tuple(enabled))
        todo = self._order(node, enabled)
        if not todo:
            return None
        node.chosen = todo[0]
        del self.keys[depth:]
        self.keys.append(key)
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
        self.pending_held = []
        last = execution.last
        while len(execution.schedule) < execution.max_steps:
            enabled = execution.enabled()
            if not enabled:
                break
            name = last if last in enabled else enabled[0]
            footprint, _ = execution.step(name)
            pending.append((name, footprint))
            if self.lock_aware:
                self.pending_held.append(self._owners())
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
        self.steps = steps
        if self.stateful:
            self._summarise(steps)
        if self.lock_aware:
            assert self.execution is not None
            execution = self.execution
            self.lock_nums = frozenset(execution.canon[lock] for lock in execution.locks)
            self.held = self.held[:n] + self.pending_held
            self.pending_held = []
        for j, fp in enumerate(steps):
            p = thr[j]
            before.append(tuple(count))
            data = self._data(fp)
            prev, deps, clock = self._clock(p, data)
            count[p] += 1
            clock[p] = pos[j] = count[p]
            self.clocks.append(clock)
            if j >= self.diverge:
                self._races(j, p, prev, deps)
            self._record(j, p, data)
            if j == n - 1 and self.next_steps:
                self._next_steps(count)

    def _summarise(self, steps: list[Footprint]) -> None:
        """Add this run's steps to the summary of every state on the stack above them;
        a run pruned at an explored state also gets that state's summary checked."""
        execution = self.execution
        assert execution is not None
        stable = {num: _stable_object(obj) for obj, num in execution.canon.items()}
        cut, self.cut = self.cut, None
        suffix: set[tuple[str, StableStep]] = set(cut) if cut else set()
        for name, fp in self.next_steps:
            suffix.add((name, _stable(fp, stable)))
        n, keys, thr, names = len(self.stack), self.keys, self.thr, self.names
        for d in range(len(steps) - 1, -1, -1):
            suffix.add((names[thr[d]], _stable(steps[d], stable)))
            if d < n and keys[d] is not None:
                self.summaries.setdefault(keys[d], set()).update(suffix)
        if cut:
            number = {obj: num for num, obj in stable.items()}
            self.next_steps.extend((name, _current(step, number)) for name, step in cut)

    def _data(self, fp: Footprint) -> Footprint:
        """``fp`` without its locks (lock-aware races: locks order no two steps)."""
        locks = self.lock_nums
        if not self.lock_aware or fp.everything or not (
                locks & fp.writes or locks & fp.reads):
            return fp
        return Footprint(fp.reads - locks, fp.writes - locks)

    def _next_steps(self, count: list[int]) -> None:
        """Races of each thread's next step at the failure, as if it ran right then."""
        thr, pos, clocks = self.thr, self.pos, self.clocks
        j = self.real
        for name, fp in self.next_steps:
            p = self.tindex[name]
            prev, deps, clock = self._clock(p, self._data(fp))
            clock[p] = count[p] + 1
            thr.insert(j, p)
            clocks.insert(j, clock)
            pos.insert(j, count[p] + 1)
            self.hypothetical = fp
            self._races(j, p, prev, deps)
            self.hypothetical = None
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
            k = self._lock_point(i, j, p) if self.lock_aware else i
            self._reverse(k, j, thr, clocks, pos, self.before)

    def _lock_point(self, i: int, j: int, p: int) -> int:
        """Where the race of steps ``i`` < ``j`` is reversed, with lock-aware races.

        Locks order no two steps here: a race is a data conflict.  Reversing it means
        running thread ``p`` up to ``j`` before ``i``; if ``p`` takes a lock on the way
        (at a step in [``i``, ``j``] or by ``j`` itself) that another thread holds at the
        node before ``i``, ``p`` cannot get there, so the race is reversed before that
        thread's acquisition of the lock instead -- repeatedly, as that node may be
        inside another critical section ``p`` needs.  Two critical sections with no
        conflicting accesses are thus never reversed: their order changes no result.
        """
        held, thr, name = self.held, self.thr, self.names[p]
        need: set[int] = set()
        for s in range(i, j):
            if thr[s] == p:
                need.update(n for n, owner in held[s].items() if owner == name)
        if self.hypothetical is not None:  # a thread's next step at a failure
            target = self.hypothetical
        else:
            target = self.steps[j]
            need.update(n for n, owner in held[j].items() if owner == name)
        need |= (target.writes | target.reads) & self.lock_nums
        k = i
        while k > 0:
            blockers = [(n, owner) for n, owner in held[k - 1].items()
                        if owner != name and n in need]
            if not blockers:
                break
            start = k
            for n, owner in blockers:
                a = k - 1
                while a > 0 and held[a - 1].get(n) == owner:
                    a -= 1
                start = min(start, a)
            for s in range(start, k):
                if thr[s] == p:
                    need.update(o for o, who in held[s].items() if who == name)
            k = start
        return k

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
        if depth < self.base:
            return  # a fixed prefix: every choice there is enumerated by the split
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


StableStep = tuple[frozenset[Hashable], frozenset[Hashable], bool]
"""A footprint by object rather than by an execution's canonical numbers."""


def _stable_object(obj: Hashable) -> Hashable:
    return ("lock", obj.name) if isinstance(obj, ModelLock) else obj


def _stable(fp: Footprint, stable: dict[int, Hashable]) -> StableStep:
    return (frozenset(stable[o] for o in fp.reads), frozenset(stable[o] for o in fp.writes),
            fp.everything)


def _current(step: StableStep, number: dict[Hashable, int]) -> Footprint:
    """A summarised step in this execution's numbers; objects this execution has not met
    are left out (no step of the run touched them, so none races on them)."""
    reads, writes, everything = step
    if everything:
        return EVERYTHING
    return Footprint(frozenset(number[o] for o in reads if o in number),
                     frozenset(number[o] for o in writes if o in number))


def search(factory: Callable[[], Instance], limits: SearchLimits,
           progress: Callable[[SearchStats], None] | None = None,
           prefix: Sequence[Node] = ()) -> SearchStats:
    """Exhaustive bounded search (see the engine's docstring).  ``progress`` is called
    with the running statistics after every run.  ``prefix`` (from :func:`split`) fixes
    the first choices: only the subtree below them is searched."""
    if limits.reduction == "dpor" and limits.por:
        engine: Dfs = Dpor(factory, limits)
    else:
        if limits.reduction == "none":
            limits.por = limits.state_hashing = False
        engine = Dfs(factory, limits)
    if prefix:
        engine.stack = [_fixed(node) for node in prefix]
        engine.base = len(prefix)
        if isinstance(engine, Dpor):
            engine.keys = [None] * len(prefix)
    engine.stats.on_record = progress
    stats = engine.run()
    stats.on_record = None
    return stats


def _fixed(node: Node) -> Node:
    return Node(dict(node.sleep), [], node.preemptions, node.last, node.last_enabled,
                node.chosen, dict(node.explored), node.enabled)


class _Prefixes(Dfs):
    """Enumerates the nodes at ``depth``: every bounded choice sequence of that length,
    with sleep sets unless the search is naive (no state hashing, no DPOR)."""

    def __init__(self, factory: Callable[[], Instance], limits: SearchLimits,
                 depth: int) -> None:
        prefix_limits = replace(limits, max_depth=depth, state_hashing=False,
                                por=limits.por and limits.reduction != "none",
                                max_schedules=None)
        super().__init__(factory, prefix_limits)
        self.depth = depth

    def collect(self) -> list[list[Node]]:
        out: list[list[Node]] = []
        while True:
            outcome = run_once(self.factory, self.limits.max_steps, self)
            if outcome is not None or len(self.stack) == self.depth:
                out.append([_fixed(node) for node in self.stack])
            else:  # every choice asleep or over the bound: no subtree
                self.stats.record(None)
            if not self._backtrack():
                return out


def split(factory: Callable[[], Instance], limits: SearchLimits,
          depth: int) -> tuple[list[list[Node]], SearchStats]:
    """The subtrees below the nodes at ``depth``, in depth-first order, and the runs cut
    before reaching it (every choice asleep or over the bound; counted as pruned).

    The first ``depth`` choices are enumerated, every one of them, with the sleep set
    each node would have in one depth-first search (the siblings explored before it).
    A subtree search (``search(..., prefix=nodes)``) never backtracks into its prefix, so
    DPOR drops the backtrack points a race would add there: every choice there is
    explored anyway.  State hashing is per subtree.  The subtrees are independent: the
    sum of their searches is the same in one process and on any number of workers.
    """
    if depth < 1:
        raise ValueError(f"split depth must be >= 1, got {depth}")
    prefixes = _Prefixes(factory, limits, depth)
    return prefixes.collect(), prefixes.stats


def merge_stats(parts: Sequence[SearchStats], into: SearchStats | None = None) -> SearchStats:
    """The statistics of several searches (subtrees) as one, outcomes in order."""
    out = into if into is not None else SearchStats()
    for part in parts:
        out.schedules += part.schedules
        out.pruned += part.pruned
        out.pruned_by_state += part.pruned_by_state
        out.complete = out.complete and part.complete
        out.outcomes.extend(part.outcomes)
    return out
