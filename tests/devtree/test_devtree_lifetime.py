"""OF-core lifetime model: holders, double put, leaks, malformed streams."""

from __future__ import annotations

import pytest

from vmferry.clock import ManualClock
from vmferry.errors import DoubleFree, UseAfterFree
from vmferry.guest.mobility import MODES, MobilityHandler, OutOfBoundsRead
from vmferry.hw.devtree import Property, RefcountUnderflow, dump_fdt, load_fdt
from vmferry.hw.devtree.tree import canonical
from vmferry.hw.spapr.platform import generate_pseries_tree
from vmferry.hw.spapr.rtas import be32
from vmferry.hw.spapr.workarea import WorkAreaOverrun


def tree():  # type: ignore[no-untyped-def]
    return load_fdt(dump_fdt(generate_pseries_tree(512, 1)))


def test_double_put_is_underflow_naming_holder() -> None:
    t = tree()
    n = t.new_node("x")
    t.attach(n, t.root)
    t.detach(n)
    t.put(n, "creation")
    assert n.released
    with pytest.raises(UseAfterFree, match="bob"):  # DYNAMIC: memory is gone
        t.put(n, "bob")
    boot = t.find_by_path("/chosen")
    assert boot is not None
    t.detach_recursive(boot)
    with pytest.raises(RefcountUnderflow, match="alice") as exc:
        t.put(boot, "alice")
    assert isinstance(exc.value, DoubleFree)


def test_holders_and_leak_report() -> None:
    t = tree()
    n = t.find_by_path("/rtas")
    assert n is not None
    t.get(n, "driver:foo")
    assert n.holders["driver:foo"] == 1
    t.detach_recursive(n)
    leaks = t.leak_report()
    assert [(x.node, x.holders) for x in leaks] == [("/rtas", (("driver:foo", 1),))]
    t.put(n, "driver:foo")
    assert not t.leak_report() and n.released


def test_foreign_put_recorded() -> None:
    t = tree()
    n = t.find_by_path("/rtas")
    assert n is not None
    t.get(n, "a")
    t.put(n, "b")
    assert [h.hazard for h in t.hazards] == ["foreign-put"] and n.refcount == 2


def test_malformed_update_nodes_page_changes_nothing() -> None:
    t = tree()
    before = canonical(t.root)

    class Rtas:
        def update_nodes(self, buf: bytearray, scope: int) -> int:
            data = bytes(16) + be32(0x01000400, 0x10000002)  # 1024 operands: crosses
            buf[:] = data + bytes(4096 - len(data))
            return 0

        def activate_firmware(self) -> int:
            return 0

    for mode, expect in (("correct", None), ("upstream", OutOfBoundsRead)):
        h = MobilityHandler(t, Rtas(), ManualClock(), MODES[mode])  # type: ignore[arg-type]
        if expect is None:
            assert h.devicetree_update(1) == -22
            assert "crosses" in h.report.errors[0]
            assert isinstance(h.report.rejections[0], WorkAreaOverrun)
            assert canonical(t.root) == before  # whole page rejected before any change
        else:
            rep = h.post_mobility_fixup()
            assert [x.hazard for x in rep.hazards] == ["out-of-bounds-read"]


def test_update_property_to_detached_node_no_notification() -> None:
    t = tree()
    n = t.find_by_path("/rtas")
    assert n is not None
    t.get(n, "me")
    t.detach_recursive(n)
    t.events.clear()
    t.update_property(n, Property("x", b"1"))
    assert not t.events and n.value("x") == b"1"


def test_large_flat_tree_attach_detach_is_linear() -> None:
    t = tree()
    nodes = [t.add_boot_node(t.root, f"n@{i}", [Property("ibm,phandle", be32(0x60000000 + i))])
             for i in range(20_000)]
    for n in nodes[::2]:
        t.detach_recursive(n)
    assert sum(1 for _ in t.root.children()) >= 10_000
    t.check_invariants()
