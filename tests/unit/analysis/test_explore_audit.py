"""Issue 15 item 1: the debug check of declared accesses (DPOR is sound only when every
shared access a step makes is declared at its yield point), and the fingerprint details
it relies on."""

from __future__ import annotations

import pytest

from vmferry.analysis.explore import Instance
from vmferry.analysis.explore.audit import audit_declarations
from vmferry.analysis.explore.fingerprint import fingerprint
from vmferry.sync import LOCAL, ModelLock, yield_point


def _counter(declare_read: bool) -> Instance:
    cells = {"a": 0, "b": 0}

    def writer() -> None:
        yield_point("write a", "a")
        cells["a"] = 1

    def reader() -> None:
        # reads a; declares it only when asked to
        yield_point("read a", "a" if declare_read else "b", write=False)
        cells["b"] = cells["a"] + 10

    return Instance({"W": writer, "R": reader}, state=lambda: fingerprint(cells),
                    starts={"W": LOCAL, "R": LOCAL})


def test_item1_audit_reports_an_undeclared_read() -> None:
    found = audit_declarations(lambda: _counter(False), runs=12)
    assert [(u.first[1], u.second[1]) for u in found] in (
        [("write a", "read a")], [("read a", "write a")])
    assert "do not commute" in str(found[0])


def test_item1_audit_accepts_exact_declarations() -> None:
    assert audit_declarations(lambda: _counter(True), runs=4) == []


def _locked_counter() -> Instance:
    """T1 doubles x right after taking the lock, T2 increments it right after releasing
    it: both at yield points that declare the lock only (x is not declared)."""
    lock = ModelLock("m")
    cells = {"x": 1}

    def t1() -> None:
        lock.acquire()
        cells["x"] *= 2
        lock.release()

    def t2() -> None:
        lock.acquire()
        lock.release()
        cells["x"] += 1

    return Instance({"T1": t1, "T2": t2}, state=lambda: fingerprint(cells),
                    starts={"T1": LOCAL, "T2": LOCAL})


def test_item1_lock_aware_audit_checks_steps_ordered_by_a_lock_alone() -> None:
    """DPOR's lock-aware races order steps by data only: an access hidden behind two
    steps that share nothing but a lock is found by the lock-aware audit, which plain
    lock ordering never needed."""
    found = audit_declarations(_locked_counter, runs=20)
    assert found and all("lock m" in str(u) or "unlock m" in str(u) for u in found)
    assert audit_declarations(_locked_counter, runs=20, lock_aware=False) == []


def test_item1_audit_needs_a_state() -> None:
    with pytest.raises(ValueError, match="state"):
        audit_declarations(lambda: Instance({"T": lambda: None}), runs=1)


@pytest.mark.parametrize(("mode", "case"), [("pre_6_7+probe_unlocked", "R4"),
                                            ("v6_15", "R1")])
def test_item1_iommu_probe_declarations_pass_the_audit(mode: str, case: str) -> None:
    from vmferry.analysis.explore.scenarios import all_scenarios

    scenario = all_scenarios()["iommu-probe"]
    (chosen,) = [c for c in scenario.cases if c.name == case]
    assert audit_declarations(lambda: chosen.build(mode), runs=2,
                              max_steps=scenario.max_steps) == []


def test_fingerprint_ignores_tuple_identity_and_set_order() -> None:
    shared = ()
    assert fingerprint([shared, shared]) == fingerprint([(), tuple([])])

    class Box:
        def __init__(self, n: int) -> None:
            self.n = n

    a, b = Box(1), Box(2)
    assert fingerprint({a, b}, [a]) == fingerprint({b, a}, [a])
    assert fingerprint({a, b}, [a]) != fingerprint({a, b}, [b])
