"""Issue 15 item 1: source-DPOR against naive enumeration.

Random small programs whose threads read and write a few shared cells (every access
declared at its yield point) must reach the same set of final outcomes -- the values each
thread read and the final cells -- under ``dpor`` and ``sleep`` as under ``naive``, while
exploring no more schedules.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.analysis.explore import Instance, explore
from vmferry.analysis.explore.dpor import merge_stats, search, split
from vmferry.analysis.explore.engine import SearchLimits
from vmferry.analysis.explore.fingerprint import fingerprint
from vmferry.errors import InvariantViolation
from vmferry.sync import LOCAL, Accesses, ModelLock, yield_point

Op = tuple[str, int]  # ("r"|"w"|"l"|"u"|"rw", cell)


def program(ops: list[list[Op]], finals: set[tuple[object, ...]], *,
            stateful: bool = False) -> Callable[[], Instance]:
    def build() -> Instance:
        cells = [0, 0, 0]
        locks = [ModelLock("l0"), ModelLock("l1")]
        seen: dict[str, list[int]] = {}

        def thread(name: str, mine: list[Op]) -> Callable[[], None]:
            def run() -> None:
                got = seen.setdefault(name, [])
                held: list[ModelLock] = []
                for k, (kind, cell) in enumerate(mine):
                    if kind == "r":
                        yield_point(f"read {cell}", ("cell", cell), write=False)
                        got.append(cells[cell])
                    elif kind == "w":
                        yield_point(f"write {cell}", ("cell", cell), write=True)
                        cells[cell] = cells[cell] * 3 + k + 1
                    elif kind == "rw":
                        yield_point(f"move {cell}", Accesses(reads=(("cell", cell),),
                                                             writes=(("cell", 2),)))
                        cells[2] = cells[cell] + 7
                    elif kind == "l" and not any(lk is locks[cell % 2] for lk in held):
                        locks[cell % 2].acquire()
                        held.append(locks[cell % 2])
                    elif kind == "u" and held:
                        held.pop().release()
                for lk in reversed(held):
                    lk.release()

            return run

        def check() -> None:
            finals.add((tuple(cells), tuple(sorted((k, tuple(v)) for k, v in seen.items()))))

        threads = {f"T{i}": thread(f"T{i}", mine) for i, mine in enumerate(ops)}
        if not stateful:
            return Instance(threads, check=check)
        return Instance(threads, check=check, state=lambda: fingerprint(cells, seen, locks),
                        roots=(cells, seen, locks))

    return build


op = st.tuples(st.sampled_from(["r", "w", "rw", "l", "u"]), st.integers(0, 2))
programs = st.lists(st.lists(op, min_size=1, max_size=2), min_size=2, max_size=3)


@settings(max_examples=30, deadline=None)
@given(programs)
def test_item1_dpor_reaches_every_outcome_naive_reaches(ops: list[list[Op]]) -> None:
    outcomes: dict[str, set[tuple[object, ...]]] = {}
    counts: dict[str, int] = {}
    for strategy in ("naive", "sleep", "dpor"):
        finals: set[tuple[object, ...]] = set()
        report = explore(program(ops, finals), strategy=strategy, failures_dir=None,
                         max_steps=200)
        assert report.complete and not report.failures, report.failures[:1]
        outcomes[strategy], counts[strategy] = finals, report.schedules_explored
    assert outcomes["dpor"] == outcomes["naive"]
    assert outcomes["sleep"] == outcomes["naive"]
    assert counts["dpor"] <= counts["naive"]


@settings(max_examples=40, deadline=None)
@given(programs, st.sampled_from([None, 0, 1]), st.booleans(), st.sampled_from([0, 1, 3]))
def test_item1_stateful_lock_aware_dpor_reaches_every_outcome_naive_reaches(
        ops: list[list[Op]], bound: int | None, lock_aware: bool, split_depth: int) -> None:
    """Lock-aware DPOR with state hashing (the default) and without the lock refinement,
    at every preemption bound, in one search or split into subtrees (issue 15 item 5):
    the final outcomes of naive enumeration, no more runs than naive without a split."""
    outcomes: dict[str, set[tuple[object, ...]]] = {}
    runs: dict[str, int] = {}
    for strategy in ("naive", "dpor"):
        finals: set[tuple[object, ...]] = set()
        limits = SearchLimits(bound, max_steps=200, reduction="dpor" if strategy == "dpor"
                              else "none", lock_aware=lock_aware)
        build = program(ops, finals, stateful=True)
        if strategy == "dpor" and split_depth:
            subtrees, stats = split(build, limits, split_depth)
            merge_stats([search(build, limits, prefix=nodes) for nodes in subtrees], stats)
        else:
            stats = search(build, limits)
        assert stats.complete and not stats.outcomes
        outcomes[strategy], runs[strategy] = finals, stats.schedules + stats.pruned
    assert outcomes["dpor"] == outcomes["naive"]
    if not split_depth:
        assert runs["dpor"] <= runs["naive"]


def test_item1_iommu_probe_dpor_finds_naives_failure_kinds_with_fewer_schedules() -> None:
    from vmferry.analysis.explore import run_scenario
    from vmferry.analysis.explore.scenarios import all_scenarios

    scenario = all_scenarios()["iommu-probe"]
    found: dict[str, tuple[int, set[str]]] = {}
    for strategy in ("naive", "dpor"):
        report = run_scenario(scenario, mode="v6_15+relock_no_recheck", case="R0",
                              strategy=strategy, failures_dir=None)
        found[strategy] = (report.schedules_explored, {f.hazard for f in report.failures})
    assert found["naive"][1] == {"invariant-violation", "null-deref"}
    assert found["dpor"][1] == found["naive"][1]
    assert 2 * found["dpor"][0] < found["naive"][0]


def test_item1_dpor_finds_every_kind_naive_finds_on_iommu_probe_r4_probe_unlocked() -> None:
    """R4 of pre_6_7+probe_unlocked: the runs end at an invariant violation before the
    walk frees D's dev_iommu; dpor reverses the races of the steps such a failure cut off
    and finds the null dereference and use-after-free behind them, as naive does."""
    from vmferry.analysis.explore import run_scenario
    from vmferry.analysis.explore.scenarios import all_scenarios

    scenario = all_scenarios()["iommu-probe"]
    kinds: dict[str, set[str]] = {}
    for strategy in ("naive", "sleep", "dpor"):
        report = run_scenario(scenario, mode="pre_6_7+probe_unlocked", case="R4",
                              strategy=strategy, failures_dir=None)
        kinds[strategy] = {f.hazard for f in report.failures}
    assert kinds["naive"] == {"invariant-violation", "null-deref", "use-after-free"}
    assert kinds["sleep"] == kinds["naive"]
    assert kinds["dpor"] == kinds["naive"]


def test_item1_dpor_reverses_races_of_steps_a_failure_cut_off() -> None:
    """T1 reads x then fails an invariant only when T2 has not written y yet; T2 writes y,
    then x.  The first run (T1 first) stops at the invariant before T2's write of x, yet
    the failure of T1 reading T2's x (an assertion) must be found too."""
    from vmferry.sync import yield_point

    def build() -> Instance:
        state = {"x": 0, "y": 0, "seen": -1}

        def t1() -> None:
            yield_point("read x", "x", write=False)
            state["seen"] = state["x"]
            yield_point("done", LOCAL)
            assert state["seen"] == 0, "T1 read T2's x"

        def t2() -> None:
            yield_point("write y", "y")
            state["y"] = 1
            yield_point("write x", "x")
            state["x"] = 1

        def invariant() -> None:
            if state["seen"] == 0 and state["y"] == 0:
                raise InvariantViolation("T1 ran before T2 started")

        return Instance({"T1": t1, "T2": t2}, invariant=invariant,
                        starts={"T1": LOCAL, "T2": LOCAL})

    kinds = {}
    for strategy in ("naive", "dpor"):
        report = explore(build, strategy=strategy, failures_dir=None)
        kinds[strategy] = {f.hazard for f in report.failures}
    assert kinds["naive"] == {"invariant-violation", "assertion"}
    assert kinds["dpor"] == kinds["naive"]
