"""Issue 15 item 1: the debug check of declared accesses (DPOR is sound only when every
shared access a step makes is declared at its yield point), and the fingerprint details
it relies on."""

from __future__ import annotations

import pytest

from vmferry.analysis.explore import Instance
from vmferry.analysis.explore.audit import audit_declarations
from vmferry.analysis.explore.fingerprint import fingerprint
from vmferry.sync import LOCAL, yield_point


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
