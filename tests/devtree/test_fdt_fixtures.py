"""FDT round trips on real QEMU pseries trees, and update sequences applied to them."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.clock import ManualClock
from vmferry.errors import StreamDecodeError
from vmferry.guest.mobility import MODES, MobilityHandler, run_post_migration_updates
from vmferry.hw.devtree import Property, dump_fdt, fdt_structure, load_fdt, structure
from vmferry.hw.devtree.fdt import (
    FdtDecodeError,
    TreeState,
    decode_state,
    encode_state,
    restore_tree,
    save_tree,
)
from vmferry.hw.devtree.tree import canonical
from vmferry.hw.spapr.platform import assign_phandles, generate_pseries_tree
from vmferry.hw.spapr.rtas import RtasFirmware, be32

FIXTURES = sorted((Path(__file__).parents[1] / "fixtures" / "pseries").glob("*.dtb"))


def test_fixtures_exist() -> None:
    assert len(FIXTURES) >= 3


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_qemu_tree_round_trips_structurally(path: Path) -> None:
    blob = path.read_bytes()
    tree = load_fdt(blob)
    tree.check_invariants()
    out = dump_fdt(tree)
    assert fdt_structure(blob) == structure(tree) == fdt_structure(out)
    assert dump_fdt(load_fdt(out)) == out  # our own export is byte-exact


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_qemu_tree_contents(path: Path) -> None:
    tree = load_fdt(path.read_bytes())
    assert tree.root.value("compatible", "t") == b"qemu,pseries\0"
    cpus = tree.find_by_path("/cpus")
    assert cpus is not None
    n_cpus = sum(1 for c in cpus.children() if c.device_type("t") == "cpu")
    assert f"{n_cpus}cpu" in path.name


def test_reservations_and_boot_cpu_round_trip() -> None:
    tree = generate_pseries_tree(512, 2)
    tree.reservations = [(0x1000, 0x2000), (0x10_0000_0000, 0x1000)]
    tree.boot_cpuid_phys = 1
    out = load_fdt(dump_fdt(tree))
    assert out.reservations == tree.reservations and out.boot_cpuid_phys == 1
    assert structure(out) == structure(tree)


@pytest.mark.parametrize("bad", [b"", b"\xd0\x0d\xfe\xed" + bytes(60), bytes(100)])
def test_bad_blob_rejected(bad: bytes) -> None:
    with pytest.raises(FdtDecodeError):
        load_fdt(bad)


def test_persist_contract() -> None:
    tree = load_fdt(FIXTURES[0].read_bytes())
    state = save_tree(tree)
    data = encode_state(state)
    assert decode_state(data) == state
    assert structure(restore_tree(decode_state(data))) == structure(tree)
    for bad in (data[:5], b"XXXX" + data[4:], data[:-1], data[:4] + b"\0\x09" + data[6:]):
        with pytest.raises(StreamDecodeError):
            decode_state(bad)
    assert isinstance(state, TreeState)


def _mutated(blob: bytes) -> tuple[bytes, bytes]:
    """A source and a destination platform derived from a QEMU tree."""
    src = load_fdt(blob)
    assign_phandles(src)
    dst = load_fdt(dump_fdt(src))
    cpus = dst.find_by_path("/cpus")
    assert cpus is not None
    for cpu in list(cpus.children()):
        assoc = cpu.value("ibm,associativity", "t")
        if assoc:
            dst.update_property(cpu, Property("ibm,associativity", assoc[:-4] + be32(7)))
    dst.update_property(dst.root, Property("model", b"IBM pSeries (destination)\0"))
    rtas = dst.find_by_path("/rtas")
    assert rtas is not None
    dst.remove_property(rtas, next(p.name for p in rtas.properties() if p.name != "ibm,phandle"))
    events = dst.find_by_path("/event-sources/epow-events")
    if events is not None:
        dst.detach_recursive(events)
    node = dst.new_node("ibm,new-facility", [Property("ibm,phandle", be32(0x7777)),
                                              Property("status", b"okay\0")])
    node.child = dst.new_node("leaf", [Property("ibm,phandle", be32(0x7778))])
    node.child.parent = node
    from vmferry.hw.devtree import Changeset
    cs = Changeset(dst)
    cs.attach_subtree(node, dst.root)
    cs.apply()
    cs.destroy()
    return dump_fdt(src), dump_fdt(dst)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
@pytest.mark.parametrize("capacity", [4096, 200])
def test_update_sequence_on_qemu_tree(path: Path, capacity: int) -> None:
    s, d = _mutated(path.read_bytes())
    src, dst, guest = load_fdt(s), load_fdt(d), load_fdt(s)
    rep = run_post_migration_updates(guest, src, dst, "correct", ManualClock(),
                                     firmware_kwargs={"capacity": capacity})
    assert rep.ok, (rep.errors, rep.hazards, rep.leaks)
    assert canonical(guest.root) == canonical(dst.root)
    kinds = {c.kind for c in rep.changes}
    assert {"update-property", "remove-property", "delete-node", "add-node"} <= kinds
    guest.check_invariants()


@pytest.mark.parametrize("path", FIXTURES[:1], ids=[p.name for p in FIXTURES[:1]])
def test_upstream_mode_loses_added_children_on_qemu_tree(path: Path) -> None:
    s, d = _mutated(path.read_bytes())
    src, dst, guest = load_fdt(s), load_fdt(d), load_fdt(s)
    h = MobilityHandler(guest, RtasFirmware(src, dst), ManualClock(), MODES["upstream"])
    rep = h.post_mobility_fixup()
    assert [leak.node for leak in rep.leaks] == ["/ibm,new-facility/leaf"]
    assert canonical(guest.root) != canonical(dst.root)
