"""Conformance checks of docs/models/pseries-mobility.md §13, one test per check."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from vmferry.clock import ManualClock
from vmferry.errors import UseAfterFree
from vmferry.guest.drivers import CacheInfo, Nx842, VioBus
from vmferry.guest.mobility import (
    MODES,
    Action,
    MobilityHandler,
    MobilityOptions,
    OutOfBoundsRead,
)
from vmferry.hw.devtree import BadPut, Changeset, DeviceTree, Property, Reconfig
from vmferry.hw.devtree.fdt import dump_fdt, load_fdt
from vmferry.hw.spapr.platform import (
    DRC_PLATFAC,
    PH_COMPRESSION,
    PH_PLATFAC,
    PH_RANDOM,
    generate_pseries_tree,
)
from vmferry.hw.spapr.rtas import (
    NodeAdd,
    NodeUpdate,
    PropChange,
    RtasFirmware,
    SubtreeSpec,
    UpdatePlan,
    be32,
)
from vmferry.hw.spapr.workarea import Cc, NodeOp, Rc, WorkArea, WorkAreaOverrun

PF = "/ibm,platform-facilities"
SEED_BUF = bytes.fromhex(
    "00000000000000000000000000000000"
    "01000004fffffff5fffffff4fffffff3fffffff6"
    "020000021000000110000002"
    "03000001000000012000000a"
    "00000000")


def page(data: bytes, fill: int = 0) -> bytes:
    return data + bytes([fill]) * (4096 - len(data))


class Scripted:
    """RTAS returning canned work areas; records what the guest passed in."""

    def __init__(self, un: list[tuple[int, bytes]] | None = None,
                 props: dict[int, list[tuple[int, bytes]]] | None = None,
                 cc: RtasFirmware | None = None) -> None:
        self.un = list(un or [])
        self.props = {k: list(v) for k, v in (props or {}).items()}
        self.cc = cc
        self.seen: list[tuple[str, bytes, int]] = []

    def update_nodes(self, buf: bytearray, scope: int) -> int:
        self.seen.append(("un", bytes(buf[:16]), scope))
        rc, data = self.un.pop(0)
        buf[:] = page(data)
        return rc

    def update_properties(self, buf: bytearray, scope: int) -> int:
        ph = int.from_bytes(buf[:4], "big")
        self.seen.append(("up", bytes(buf[:16]), scope))
        rc, data = self.props[ph].pop(0)
        buf[:] = page(data)
        return rc

    def configure_connector(self, buf: bytearray, extent: bytearray | None = None) -> int:
        assert self.cc is not None
        return self.cc.configure_connector(buf, extent)

    def activate_firmware(self) -> int:
        return 0


def props_page(ph: int, descs: list[tuple[str, int, bytes]], path: str | None = None,
               state: int = 0) -> bytes:
    body = b""
    n = len(descs)
    if path is not None:
        p = path.encode() + b"\0"
        body += b"\0" + be32(len(p)) + p
        n += 1
    for name, vd, value in descs:
        body += name.encode() + b"\0" + be32(vd) + value
    return be32(ph, state, 0, 0, n) + body


def guest(memory: int = 512, **platform: object) -> DeviceTree:
    return load_fdt(dump_fdt(generate_pseries_tree(memory, 1, **platform)))


def handler(tree: DeviceTree, rtas: object, mode: str | MobilityOptions = "correct",
            **kw: object) -> MobilityHandler:
    opts = MODES[mode] if isinstance(mode, str) else mode
    return MobilityHandler(tree, rtas, ManualClock(), opts, **kw)  # type: ignore[arg-type]


def pf_spec(src: DeviceTree) -> SubtreeSpec:
    node = src.find_by_path(PF)
    assert node is not None
    return SubtreeSpec.of(node)


def seed_firmware(src: DeviceTree, **kw: object) -> RtasFirmware:
    plan = UpdatePlan(deletes=(0xFFFFFFF5, 0xFFFFFFF4, 0xFFFFFFF3, 0xFFFFFFF6),
                      adds=(NodeAdd(0x10000000, DRC_PLATFAC, pf_spec(src)),))
    return RtasFirmware(src, src, plan=plan, **kw)  # type: ignore[arg-type]


def snapshot(tree: DeviceTree) -> list[tuple[int, str, int, tuple[tuple[str, int], ...]]]:
    return [(id(n), n.path(), n.refcount, tuple(sorted(n.holders.items())))
            for n in tree.walk()]


# --- binary parsing / RTAS protocol -----------------------------------------------------------


def test_check_1_update_nodes_example_actions() -> None:
    h = handler(guest(), Scripted())
    wa = WorkArea(bytearray(page(SEED_BUF, fill=0xEE)))
    acts = list(h._walk_page(wa, lambda ph: True))
    assert [(a.op, a.phandle) for a in acts[:4]] == [
        (NodeOp.DELETE, p) for p in (0xFFFFFFF5, 0xFFFFFFF4, 0xFFFFFFF3, 0xFFFFFFF6)]
    assert [(a.op, a.phandle) for a in acts[4:6]] == [(NodeOp.UPDATE, 0x10000001),
                                                      (NodeOp.UPDATE, 0x10000002)]
    assert acts[6] == Action(NodeOp.ADD, 0x00000001, 0x2000000A, 0x34)
    assert len(acts) == 7  # stopped at the terminator at 0x3c, not in the 0xEE fill


def test_check_2_continuation_header_echoed() -> None:
    src, dst = generate_pseries_tree(512, 2), generate_pseries_tree(512, 2, numa_domain=3)
    fw = RtasFirmware(src, dst, capacity=64)
    seen: list[bytes] = []
    orig = fw.update_nodes

    def spy(buf: bytearray, scope: int) -> int:
        seen.append(bytes(buf[:16]))
        assert scope == 1
        rc = orig(buf, scope)
        seen.append(bytes(buf[:16]))
        return rc
    fw.update_nodes = spy  # type: ignore[method-assign]
    tree = load_fdt(dump_fdt(src))
    assert handler(tree, fw).devicetree_update(1) == 0
    assert seen[0] == bytes(16)
    assert len(seen) >= 4
    assert seen[2] == seen[1] != bytes(16)  # second call carries the first call's header


def test_check_3_tampered_continuation_header() -> None:
    src, dst = generate_pseries_tree(512, 4), generate_pseries_tree(512, 4, numa_domain=1)
    fw = RtasFirmware(src, dst, capacity=64)
    buf = bytearray(4096)
    assert fw.update_nodes(buf, 1) == Rc.MORE
    buf[5] ^= 1
    assert fw.update_nodes(buf, 1) == Rc.PARAM_ERROR


def test_check_4_noop_and_terminator_words() -> None:
    h = handler(guest(), Scripted())
    data = page(bytes(16) + be32(0x02000000, 0x01000001, 0x10000001, 0x00000005, 0x01000001))
    acts = list(h._walk_page(WorkArea(bytearray(data)), lambda ph: True))
    assert acts == [Action(NodeOp.DELETE, 0x10000001, None, 0x18)]


def test_check_5_add_count_is_pairs() -> None:
    h = handler(guest(), Scripted())
    data = page(bytes(16) + be32(0x03000002, 1, 0x20000001, 2, 0x20000002, 0x01000001, 7, 0))
    acts = list(h._walk_page(WorkArea(bytearray(data)), lambda ph: True))
    assert [(a.op, a.phandle, a.drc_index) for a in acts] == [
        (NodeOp.ADD, 1, 0x20000001), (NodeOp.ADD, 2, 0x20000002), (NodeOp.DELETE, 7, None)]


def test_check_6_failed_add_lookup_cursor() -> None:
    data = bytes(16) + be32(0x03000002, 0x0BADBAD0, 0x20000001, 0x10000000, 0x20000002, 0)
    faulty = handler(guest(), Scripted([(0, data)]), "misaligned_add")
    faulty.devicetree_update(1)
    assert [a.phandle for a in faulty.report.actions][:2] == [0x0BADBAD0, 0x20000001]
    src = generate_pseries_tree(512, 1)
    cc = RtasFirmware(src, src, plan=UpdatePlan())
    ok = handler(guest(), Scripted([(0, data)], cc=cc))
    ok.devicetree_update(1)
    assert [(a.op, a.phandle, a.drc_index) for a in ok.report.actions] == [
        (NodeOp.ADD, 0x0BADBAD0, 0x20000001), (NodeOp.ADD, 0x10000000, 0x20000002)]
    assert any("Failed lookup: phandle 0xbadbad0" in w for w in ok.report.warnings)


def _assoc_firmware(faults: dict[tuple[str, int], int]) -> tuple[RtasFirmware, DeviceTree]:
    src = generate_pseries_tree(512, 1)
    dst = generate_pseries_tree(512, 1, numa_domain=2)
    return RtasFirmware(src, dst, faults=faults), dst


def check_busy_and_delay(check: int, status: int) -> None:
    """Checks 7 and 8: the update retries after a busy / extended-delay status."""
    fw, _ = _assoc_firmware({("ibm,update-nodes", 1): status})
    tree = guest()
    before = snapshot(tree)
    h = handler(tree, fw, "upstream")
    assert h.devicetree_update(1) == status
    assert snapshot(tree) == before
    fw2, _ = _assoc_firmware({("ibm,update-nodes", 1): status})
    tree2, ref = guest(), guest()
    h2 = handler(tree2, fw2)
    t0 = h2.clock.monotonic()
    assert h2.devicetree_update(1) == 0
    handler(ref, _assoc_firmware({})[0]).devicetree_update(1)
    from vmferry.hw.devtree.tree import canonical
    assert canonical(tree2.root) == canonical(ref.root)
    if check == 8:
        assert h2.clock.monotonic() - t0 >= 0.010


def test_check_7_busy_retry() -> None:
    check_busy_and_delay(7, -2)


def test_check_8_extended_delay_retry() -> None:
    check_busy_and_delay(8, 9901)


def _cpu_props_handler(pages: list[tuple[int, bytes]], mode: str = "correct",
                       ) -> tuple[MobilityHandler, DeviceTree]:
    tree = guest()
    cpu = 0x10000006
    fw = Scripted(props={cpu: pages})
    return handler(tree, fw, mode), tree


def test_check_9_update_properties_example() -> None:
    value = be32(5, 0, 0, 1, 1, 0)
    h, tree = _cpu_props_handler([(0, props_page(0x10000006, [
        ("ibm,associativity", 24, value)], path="/cpus/PowerPC,POWER9@0"))])
    cpu = tree.find_by_path("/cpus/PowerPC,POWER9@0")
    assert cpu is not None
    old = cpu.prop("ibm,associativity")
    h.update_node(cpu)
    assert cpu.value("ibm,associativity") == value
    assert old in cpu.deadprops
    assert cpu.prop("") is None


def test_check_10_delete_descriptor() -> None:
    h, tree = _cpu_props_handler([
        (0, props_page(0x10000006, [("slb-size", 0x80000000, b"")], "/cpus/x")),
        (0, props_page(0x10000006, [("no-such", 0x80000000, b"")], "/cpus/x"))])
    cpu = tree.find_by_path("/cpus/PowerPC,POWER9@0")
    assert cpu is not None
    tree.events.clear()
    h.update_node(cpu)
    assert cpu.prop("slb-size") is None
    assert [p.name for p in cpu.deadprops] == ["slb-size"]
    assert [e.action for e in tree.events] == [Reconfig.REMOVE_PROPERTY]
    before = cpu.properties()
    h.update_node(cpu)
    assert cpu.properties() == before


def test_check_11_name_only_descriptor_ignored() -> None:
    h, tree = _cpu_props_handler([(0, props_page(0x10000006, [("ibm,new-flag", 0, b"")]))])
    cpu = tree.find_by_path("/cpus/PowerPC,POWER9@0")
    assert cpu is not None
    before = cpu.properties()
    h.update_node(cpu)
    assert cpu.properties() == before


def test_check_12_split_value_one_notification() -> None:
    a, b = bytes(range(256)) * 15 + bytes(160), bytes([7]) * 2000
    assert len(a) == 4000
    h, tree = _cpu_props_handler([
        (1, props_page(0x10000006, [("ibm,dynamic-memory", 0xFFFFF060, a)], "/x")),
        (0, props_page(0x10000006, [("ibm,dynamic-memory", 0x7D0, b)], state=1))])
    cpu = tree.find_by_path("/cpus/PowerPC,POWER9@0")
    assert cpu is not None
    tree.events.clear()
    h.update_node(cpu)
    assert [e.action for e in tree.events] == [Reconfig.ADD_PROPERTY]
    assert cpu.value("ibm,dynamic-memory") == a + b


@pytest.mark.parametrize("mode", ["upstream", "correct"])
def test_check_13_stream_ends_mid_value(mode: str) -> None:
    h, tree = _cpu_props_handler([
        (0, props_page(0x10000006, [("big", 0xFFFFFF00, bytes(256))]))], mode)
    cpu = tree.find_by_path("/cpus/PowerPC,POWER9@0")
    assert cpu is not None
    h.update_node(cpu)
    assert cpu.prop("big") is None
    if mode == "upstream":
        assert h.report.leaked_partials == 1
    else:
        assert h.report.leaked_partials == 0 and h.report.errors


@pytest.mark.parametrize("mode", ["upstream", "correct"])
def test_check_14_partial_then_other_name(mode: str) -> None:
    h, tree = _cpu_props_handler([
        (1, props_page(0x10000006, [("a", 0xFFFFFFFC, b"AAAA")])),
        (0, props_page(0x10000006, [("b", 4, b"BBBB")], state=1))], mode)
    cpu = tree.find_by_path("/cpus/PowerPC,POWER9@0")
    assert cpu is not None
    h.update_node(cpu)
    if mode == "upstream":
        assert cpu.value("a") == b"AAAABBBB" and cpu.prop("b") is None
    else:
        assert cpu.prop("a") is None and cpu.prop("b") is None and h.report.errors


def test_check_15_descriptor_crosses_work_area() -> None:
    bad = be32(0x10000006, 0, 0, 0, 1) + b"p\0" + be32(5000)
    h, tree = _cpu_props_handler([(0, bad), (0, bad)])
    cpu = tree.find_by_path("/cpus/PowerPC,POWER9@0")
    assert cpu is not None
    before = cpu.properties()
    h.update_node(cpu)
    assert cpu.properties() == before
    assert any("crosses" in e for e in h.report.errors)
    with pytest.raises(WorkAreaOverrun):
        h._parse_props(WorkArea(bytearray(page(bad))))
    faulty = handler(tree, h.rtas, "upstream")
    with pytest.raises(OutOfBoundsRead):
        faulty._parse_props(WorkArea(bytearray(page(bad))))
    assert cpu.properties() == before


# --- configure-connector ----------------------------------------------------------------------


def _cc(style: str = "papr", mode: str = "correct", faults: dict[tuple[str, int], int]
        | None = None, spec: SubtreeSpec | None = None,
        ) -> tuple[MobilityHandler, DeviceTree, RtasFirmware]:
    src = generate_pseries_tree(512, 1)
    plan = UpdatePlan(adds=(NodeAdd(0x10000000, DRC_PLATFAC, spec or pf_spec(src)),))
    fw = RtasFirmware(src, src, plan=plan, cc_style=style, faults=faults)
    tree = guest()
    return handler(tree, Scripted(cc=fw), mode), tree, fw


def test_check_17_papr_sequence_builds_tree() -> None:
    h, tree, _ = _cc()
    top = h.configure_connector(DRC_PLATFAC, tree.root)
    assert top is not None and top.name == "ibm,platform-facilities"
    kids = list(top.children())
    assert [k.name for k in kids] == ["ibm,random-v1", "ibm,compression-v1",
                                      "ibm,sym-encryption-v1"]
    for n in (top, *kids):
        assert not n.detached and n.refcount == 1 and n.flags.name == "DYNAMIC"
    assert top.parent is tree.root
    assert [p.name for p in kids[0].properties()][:3] == ["name", "compatible", "status"]


@pytest.mark.parametrize("mode", ["correct", "upstream"])
def test_check_18_busy_and_delay_in_cc(mode: str) -> None:
    faults = {("ibm,configure-connector", 3): -2, ("ibm,configure-connector", 6): 9900}
    h, tree, _ = _cc(faults=faults, mode=mode)
    top = h.configure_connector(DRC_PLATFAC, tree.root)
    assert top is not None and len(list(top.children())) == 3
    legacy = replace(MODES["upstream"], cc_client="legacy")
    h2, tree2, _ = _cc(faults=faults, mode="correct")
    h2.opts = legacy
    assert h2.configure_connector(DRC_PLATFAC, tree2.root) is None
    assert not tree2._dynamic_live


def test_check_19_qemu_style_sibling_loss() -> None:
    h, tree, _ = _cc(style="qemu", mode="upstream")
    top = h.configure_connector(DRC_PLATFAC, tree.root)
    assert top is not None
    assert [k.name for k in top.children()] == ["ibm,sym-encryption-v1"]
    h.tree.attach(top, tree.root, keep_links=True)
    lost = {leak.node.rsplit("/", 1)[-1] for leak in tree.leak_report()}
    assert lost == {"ibm,random-v1", "ibm,compression-v1"}
    hc, treec, _ = _cc(style="qemu")
    topc = hc.configure_connector(DRC_PLATFAC, treec.root)
    assert topc is not None and len(list(topc.children())) == 3


def test_check_20_more_memory() -> None:
    big = SubtreeSpec("blob", (Property("data", bytes(6000)),))
    h, tree, _ = _cc(mode="upstream", spec=big)
    assert h.configure_connector(DRC_PLATFAC, tree.root) is None
    assert not tree._dynamic_live
    hc, treec, _ = _cc(spec=big)
    top = hc.configure_connector(DRC_PLATFAC, treec.root)
    assert top is not None and top.value("data") == bytes(6000)


def test_check_21_unusable_connector() -> None:
    src = generate_pseries_tree(512, 1)
    plan = UpdatePlan(adds=(NodeAdd(0x10000000, DRC_PLATFAC, pf_spec(src)),))
    fw = RtasFirmware(src, src, plan=plan, unusable_drcs=frozenset({DRC_PLATFAC}))
    tree = guest()
    h = handler(tree, Scripted(cc=fw))
    assert h.configure_connector(DRC_PLATFAC, tree.root) is None
    assert not tree._dynamic_live


class _Responses:
    def __init__(self, seq: list[tuple[int, str]]) -> None:
        self.seq = seq

    def configure_connector(self, buf: bytearray, extent: bytearray | None = None) -> int:
        rc, name = self.seq.pop(0)
        buf[20:20 + len(name) + 1] = name.encode() + b"\0"
        buf[8:12] = be32(20)
        buf[12:20] = be32(0, 20 + len(name) + 1)
        return rc


@pytest.mark.parametrize("first", [Cc.NEXT_SIBLING, Cc.NEXT_PROPERTY])
def test_check_22_out_of_order_cc(first: Cc) -> None:
    tree = guest()
    kernel = handler(tree, _Responses([(first, "x"), (0, "")]), "upstream")
    assert kernel.configure_connector(1, tree.root) is None
    assert [h.hazard for h in kernel.report.hazards] == ["null-dereference"]
    correct = handler(tree, _Responses([(first, "x"), (0, "")]))
    assert correct.configure_connector(1, tree.root) is None
    assert correct.report.errors and not correct.report.hazards


def test_check_23_unknown_drc() -> None:
    src = generate_pseries_tree(512, 1)
    fw = RtasFirmware(src, src, plan=UpdatePlan(), cc_style="qemu")
    buf = bytearray(4096)
    buf[:4] = be32(0x12345678)
    assert fw.configure_connector(buf) == Rc.PARAM_ERROR


# --- OF core refcounting ----------------------------------------------------------------------


def test_check_24_detach_recursive_boot_vs_dynamic() -> None:
    tree = guest()
    vty = tree.find_by_path("/vdevice/vty@71000000")
    assert vty is not None
    tree.detach_recursive(vty)
    assert vty.released and vty.refcount == 0
    assert vty.value("compatible", "test") == b"hvterm1\0"  # boot memory still valid
    dyn = tree.new_node("dyn", [Property("x", b"1")])
    tree.attach(dyn, tree.root)
    tree.detach_recursive(dyn)
    with pytest.raises(UseAfterFree, match="dyn"):
        dyn.prop("x", "test")


def test_check_25_bad_put() -> None:
    tree = guest()
    vty = tree.find_by_path("/vdevice/vty@71000000")
    assert vty is not None
    tree.put(vty, "creation")
    with pytest.raises(BadPut):
        tree.put(vty, "sysfs")
    assert not vty.released and vty.refcount == 1


def test_check_26_get_on_zero() -> None:
    tree = guest()
    vty = tree.find_by_path("/vdevice/vty@71000000")
    assert vty is not None
    tree.detach_recursive(vty)
    with pytest.raises(UseAfterFree, match="reader"):
        tree.get(vty, "reader")
    tree.observe = True
    tree.get(vty, "reader")
    assert [h.hazard for h in tree.hazards] == ["use-after-free"]
    assert tree.hazards[0].holder == "reader"


def test_check_27_detach_effects() -> None:
    tree = guest()
    node = tree.find_by_path(PF + "/ibm,random-v1")
    assert node is not None
    parent = node.parent
    owners: list[str | None] = []
    tree.notifiers.append(lambda e: owners.append(tree.of_mutex.owner))
    tree.detach(node)
    assert tree.find_by_phandle(PH_RANDOM, "t") is None
    assert node.parent is parent and not node.in_sysfs
    assert tree.events[-1].action is Reconfig.DETACH_NODE and owners == [None]


def test_check_28_attach_discards_children_vs_changeset() -> None:
    tree = guest()
    top, kid = tree.new_node("top"), tree.new_node("kid")
    top.child, kid.parent = kid, top
    tree.attach(top, tree.root)
    assert top.child is None
    assert [leak.node for leak in tree.leak_report()] == ["/top/kid"]
    tree2 = guest()
    top2, kid2 = tree2.new_node("top"), tree2.new_node("kid")
    top2.child, kid2.parent = kid2, top2
    tree2.events.clear()
    cs = Changeset(tree2)
    cs.attach_subtree(top2, tree2.root)
    cs.apply()
    cs.destroy()
    assert tree2.find_by_path("/top/kid") is kid2 and not tree2.leak_report()
    assert [e.action for e in tree2.events] == [Reconfig.ATTACH_NODE] * 2
    assert kid2.in_sysfs and top2.in_sysfs


def test_check_29_changeset_revert() -> None:
    tree = guest()
    before = snapshot(tree)
    from vmferry.hw.devtree.tree import canonical
    shape = canonical(tree.root)
    tree.events.clear()
    rtas = tree.find_by_path("/rtas")
    vty = tree.find_by_path("/vdevice/vty@71000000")
    assert rtas is not None and vty is not None
    cs = Changeset(tree)
    cs.update(rtas, Property("rtas-size", be32(1)))
    cs.detach(vty)
    cs.detach(vty)  # third entry fails: already detached
    with pytest.raises(Exception, match="not attached"):
        cs.apply()
    cs.destroy()
    assert canonical(tree.root) == shape and not tree.events
    assert sorted(snapshot(tree)) == sorted(before)


# --- seed scenario ----------------------------------------------------------------------------


def _seed(mode: str, **platform: object) -> tuple[DeviceTree, VioBus, MobilityHandler]:
    src = generate_pseries_tree(512, 1, **platform)
    tree = load_fdt(dump_fdt(src))
    bus = VioBus(tree)
    h = handler(tree, seed_firmware(src), mode)
    return tree, bus, h


def test_check_30_no_filter_use_after_free() -> None:
    tree, bus, h = _seed("no_pf_skip")
    rep = h.post_mobility_fixup()
    container = tree.find_by_path(PF)
    assert container is not None and container.child is None  # re-added without children
    assert {leak.state for leak in rep.leaks} == {"detached", "unlinked"}
    with pytest.raises(UseAfterFree, match="addition on 0"):
        bus.devspec("ibm,random-v1")


def test_check_31_filter_on() -> None:
    tree, bus, h = _seed("correct")
    before = snapshot(tree)
    rep = h.post_mobility_fixup()
    assert sum("ignoring remove" in n for n in rep.notices) == 4
    assert sum("ignoring add" in n for n in rep.notices) == 1
    assert not tree._dynamic_live and not rep.leaks
    assert snapshot(tree) == before
    assert bus.devspec("ibm,random-v1") == PF + "/ibm,random-v1"


def test_check_32_recognition_by_device_type() -> None:
    tree, _bus, h = _seed("correct")
    pf = tree.find_by_path(PF)
    assert pf is not None
    tree.remove_property(pf, "device_type")
    rep = h.post_mobility_fixup()
    assert not any("ignoring remove" in n for n in rep.notices)
    tree2 = guest()
    other = tree2.new_node("facilities-renamed", [
        Property("device_type", b"ibm,platform-facilities\0"),
        Property("ibm,phandle", be32(0x7000))])
    tree2.attach(other, tree2.root)
    h2 = handler(tree2, Scripted([(0, bytes(16) + be32(0x01000001, 0x7000, 0))]))
    h2.devicetree_update(1)
    assert tree2.find_by_path("/facilities-renamed") is other
    assert h2.report.notices


def test_check_33_single_leaf_add() -> None:
    src = generate_pseries_tree(512, 1)
    leaf = next(c for c in pf_spec(src).children if c.name == "ibm,random-v1")
    plan = UpdatePlan(adds=(NodeAdd(PH_PLATFAC, 0x20000077, leaf),))
    tree = load_fdt(dump_fdt(src))
    bus = VioBus(tree)
    h = handler(tree, RtasFirmware(src, src, plan=plan))
    h.devicetree_update(1)
    pf = tree.find_by_path(PF)
    assert pf is not None
    names = sorted(c.sysfs_name for c in pf.children())
    assert "ibm,random-v1#1" in names
    assert len(bus.devices) == 3 + 1  # no new vio device (vty + three facilities)


@pytest.mark.parametrize("quirk", [True, False])
def test_check_34_update_compression_limits(quirk: bool) -> None:
    src = generate_pseries_tree(512, 1)
    dst = generate_pseries_tree(512, 1, max_sync_cop_len=0x2000)
    new = dst.find_by_path(PF + "/ibm,compression-v1")
    assert new is not None
    upd = NodeUpdate(PH_COMPRESSION, new.path(), (
        PropChange("ibm,max-sync-cop", new.value("ibm,max-sync-cop")),))
    tree = load_fdt(dump_fdt(src))
    nx = Nx842(VioBus(tree), filter_quirk=quirk)
    assert nx.limits.max_sync_size == 0x1000
    handler(tree, RtasFirmware(src, dst, plan=UpdatePlan(updates=(upd,)))).devicetree_update(1)
    node = tree.find_by_path(PF + "/ibm,compression-v1")
    assert node is not None and node.value("ibm,max-sync-cop") == new.value("ibm,max-sync-cop")
    assert nx.notifications == 1
    assert nx.limits.max_sync_size == (0x1000 if quirk else 0x2000)


def test_check_35_merge_readd() -> None:
    src = generate_pseries_tree(512, 1)
    dst = generate_pseries_tree(512, 1, shared_interrupt_pool=0xFFFFFFF1)
    tree = load_fdt(dump_fdt(src))
    VioBus(tree)
    tree.events.clear()
    h = handler(tree, RtasFirmware(src, dst), "merge_readd")
    h.devicetree_update(1)
    acts = [e.action for e in tree.events]
    assert Reconfig.DETACH_NODE not in acts
    assert [(e.path.rsplit("/", 1)[-1], e.prop.name if e.prop else "") for e in tree.events] \
        == [(n, "ibm,shared-interrupt-pool") for n in (
            "ibm,random-v1", "ibm,compression-v1", "ibm,sym-encryption-v1")]
    assert not tree._dynamic_live


# --- flow, ordering, concurrency -------------------------------------------------------------


def test_check_36_fixup_order() -> None:
    tree, _bus, h = _seed("correct")
    h.cacheinfo = CacheInfo(tree)
    rep = h.post_mobility_fixup()
    assert rep.trace == ["activate-firmware", "cpus_read_lock", "cacheinfo_teardown",
                         "update-nodes", "cacheinfo_rebuild", "cpus_read_unlock",
                         "mitigations", "24x7"]


@pytest.mark.parametrize("teardown", [False, True])
def test_check_38_cacheinfo(teardown: bool) -> None:
    src = generate_pseries_tree(512, 1)
    dst = generate_pseries_tree(512, 1, l2_size=1 << 20)
    tree = load_fdt(dump_fdt(src))
    ci = CacheInfo(tree)
    opts = replace(MODES["correct"], cacheinfo_teardown=teardown)
    handler(tree, RtasFirmware(src, dst), opts, cacheinfo=ci).post_mobility_fixup()
    assert bool(ci.stale()) is not teardown


@pytest.mark.parametrize("held", [False, True])
def test_check_46_user_space_stale_limits(held: bool) -> None:
    src = generate_pseries_tree(512, 1)
    dst = generate_pseries_tree(512, 1, max_sync_cop_len=0x2000)
    tree = load_fdt(dump_fdt(src))
    nx = Nx842(VioBus(tree))
    clock = ManualClock()
    opts = replace(MODES["correct"], platfac_filter=False, merge_readd=True,
                   user_space=MODES["correct"].user_space if held else
                   MODES["upstream"].user_space)
    h = MobilityHandler(tree, RtasFirmware(src, dst), clock, opts,
                        user_space=lambda: nx.compress(clock.monotonic()) and None)
    rep = h.post_mobility_fixup()
    stale = [lim for _, lim in nx.ops if lim.max_sync_size == 0x1000]
    if held:
        assert not stale and rep.exposure_window_s == 0.0
        assert all(t >= rep.updated_at for t, _ in nx.ops)
    else:
        assert stale and rep.exposure_window_s > 0.0


def test_check_47_node_removed_before_lookup() -> None:
    tree = guest()
    rtas = tree.find_by_path("/rtas")
    assert rtas is not None
    tree.detach_recursive(rtas)  # DLPAR remove won the race
    h = handler(tree, Scripted([(0, bytes(16) + be32(0x02000001, 0x10000002, 0))]))
    assert h.devicetree_update(1) == 0
    assert any("Failed lookup: phandle 0x10000002" in w for w in h.report.warnings)


@pytest.mark.parametrize("legacy", [False, True])
def test_check_49_missing_update_nodes_token(legacy: bool) -> None:
    tree = guest()
    opts = replace(MODES["correct"], missing_token_is_error=legacy)
    h = MobilityHandler(tree, Scripted(), ManualClock(), opts, tokens=frozenset())
    assert h.devicetree_update(1) == (-22 if legacy else 0)


def test_check_50_reference_balance() -> None:
    tree, _bus, h = _seed("correct")
    ci = CacheInfo(tree)
    h.cacheinfo = ci
    total, live = tree.refcount_total(), {id(n) for n in tree.walk()}
    h.post_mobility_fixup()
    assert tree.refcount_total() == total and {id(n) for n in tree.walk()} == live
    assert not tree._dynamic_live


def test_work_area_must_be_4096() -> None:
    from vmferry.hw.spapr.workarea import TruncatedWorkArea
    with pytest.raises(TruncatedWorkArea):
        WorkArea(bytearray(100))


def test_split_value_over_firmware_calls() -> None:
    """Large ibm,dynamic-memory (1024 LMBs, 24 KiB) travels split over several calls."""
    src = generate_pseries_tree(256 * 1024, 1)
    dst = generate_pseries_tree(256 * 1024, 1, numa_domain=1)
    tree = load_fdt(dump_fdt(src))
    h = handler(tree, RtasFirmware(src, dst))
    assert h.devicetree_update(1) == 0
    node = tree.find_by_path("/ibm,dynamic-reconfiguration-memory")
    want = dst.find_by_path("/ibm,dynamic-reconfiguration-memory")
    assert node is not None and want is not None
    assert node.value("ibm,dynamic-memory") == want.value("ibm,dynamic-memory")
    assert len(want.value("ibm,dynamic-memory") or b"") > 3 * 4096
    assert struct.unpack(">I", (node.value("ibm,dynamic-memory") or b"")[:4])[0] == 1024


@pytest.mark.parametrize("locked", [True, False])
def test_check_16_shared_rtas_buffer(locked: bool) -> None:
    from vmferry.analysis.explore import explore
    from vmferry.analysis.explore.api import Instance
    from vmferry.guest.mobility import RtasDataBuf

    def build() -> Instance:
        src = generate_pseries_tree(512, 2)
        dst = generate_pseries_tree(512, 2, numa_domain=1)
        tree = load_fdt(dump_fdt(src))
        fw = RtasFirmware(src, dst)
        shared = RtasDataBuf(locked=locked)
        cpus = [tree.find_by_path(f"/cpus/PowerPC,POWER9@{i}") for i in (0, 1)]
        want = [dst.find_by_path(f"/cpus/PowerPC,POWER9@{i}") for i in (0, 1)]
        hs = [handler(tree, fw, data_buf=shared) for _ in (0, 1)]

        def worker(i: int) -> None:
            node = cpus[i]
            assert node is not None
            hs[i].update_node(node)

        def check() -> None:
            for got, exp in zip(cpus, want, strict=True):
                assert got is not None and exp is not None
                assert got.value("ibm,associativity") == exp.value("ibm,associativity")
        return Instance(threads={"t0": lambda: worker(0), "t1": lambda: worker(1)},
                        check=check)

    report = explore(build, preemption_bound=2, failures_dir=None)
    assert report.complete
    if locked:
        assert not report.failures, report.failures[0].message
    else:
        assert any(f.hazard == "shared-buffer-corruption" for f in report.failures)


@pytest.mark.parametrize("lock", [True, False])
def test_check_37_cpu_offline_during_update(lock: bool) -> None:
    from vmferry.analysis.explore import explore
    from vmferry.analysis.explore.api import Instance

    def build() -> Instance:
        src = generate_pseries_tree(512, 2)
        dst = generate_pseries_tree(512, 2, numa_domain=1)
        tree = load_fdt(dump_fdt(src))
        h = handler(tree, RtasFirmware(src, dst),
                    replace(MODES["correct"], cpus_read_lock=lock))
        return Instance(threads={"mobility": h._fixup_steps, "hotplug": lambda: h.cpu_offline(1)})

    report = explore(build, preemption_bound=1, failures_dir=None)
    assert report.complete
    if lock:
        assert not report.failures, report.failures[0].message
    else:
        assert any(f.hazard == "invariant-violation" for f in report.failures)


def test_check_48_sysfs_migration_file() -> None:
    from vmferry.guest.mobility import MobilitySysfs
    calls: list[int] = []
    sysfs = MobilitySysfs(lambda h: calls.append(h) or 0)
    assert sysfs.write_migration("not-a-number\n") == -22 and not calls
    assert sysfs.write_migration("0x1234\n") == len("0x1234\n") and calls == [0x1234]
    assert sysfs.api_version == "1"
