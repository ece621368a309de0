"""Benchmark: a post-migration update-nodes sequence touching 10,000 nodes of a
100,000-node tree, against rebuilding the whole tree from the destination's FDT.

Prints JSON.  Run: ``PYTHONPATH=src python benchmarks/lpm_update.py [--nodes N --touch K]``.
"""

from __future__ import annotations

import argparse
import json
import time

from vmferry.clock import ManualClock
from vmferry.guest.mobility import MODES, MobilityHandler
from vmferry.hw.devtree import DeviceTree, Property, dump_fdt, load_fdt
from vmferry.hw.devtree.tree import canonical
from vmferry.hw.spapr.platform import generate_pseries_tree
from vmferry.hw.spapr.rtas import RtasFirmware, be32, compute_update_plan


def big_tree(nodes: int) -> DeviceTree:
    tree = generate_pseries_tree(4096, 8)
    base = tree.add_boot_node(tree.root, "bench", [Property("ibm,phandle", be32(0x50000000))])
    have = sum(1 for _ in tree.walk())
    groups = max(1, -(-(nodes - have - 1) // 1000))
    ph = 0x50000001
    for g in range(groups):
        grp = tree.add_boot_node(base, f"group@{g}", [Property("ibm,phandle", be32(ph))])
        ph += 1
        for i in range(min(999, nodes - have - g * 1000 - 1)):
            tree.add_boot_node(grp, f"dev@{i}", [
                Property("ibm,phandle", be32(ph)), Property("reg", be32(i)),
                Property("ibm,associativity", be32(4, 0, 0, 0, g % 4)),
                Property("status", b"okay\0")])
            ph += 1
    return tree


def destination(src_blob: bytes, touch: int) -> DeviceTree:
    """Touch ``touch`` nodes: 80% property updates, 10% deletes, 10% re-parented adds."""
    dst = load_fdt(src_blob)
    bench = dst.find_by_path("/bench")
    assert bench is not None
    leaves = [n for g in bench.children() for n in g.children()]
    step = max(1, len(leaves) // touch)
    chosen = leaves[::step][:touch]
    n_del = touch // 10
    n_add = touch // 10
    for n in chosen[n_del + n_add:]:
        assoc = n.value("ibm,associativity") or b""
        dst.update_property(n, Property("ibm,associativity", assoc[:-4] + be32(7)))
    for n in chosen[:n_del]:
        dst.detach_recursive(n)
    groups = list(bench.children())
    for i in range(n_add):
        dst.attach(dst.new_node(f"new@{i}", [Property("ibm,phandle", be32(0x70000000 + i)),
                                            Property("status", b"okay\0")]),
                   groups[i % len(groups)])
    return load_fdt(dump_fdt(dst))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--touch", type=int, default=10_000)
    args = ap.parse_args()
    src = big_tree(args.nodes)
    src_blob = dump_fdt(src)
    dst = destination(src_blob, args.touch)
    dst_blob = dump_fdt(dst)
    guest = load_fdt(src_blob)
    n_nodes = sum(1 for _ in guest.walk())

    t0 = time.perf_counter()
    plan = compute_update_plan(src, dst)
    fw = RtasFirmware(src, dst, plan=plan)
    t_plan = time.perf_counter() - t0

    clock = ManualClock()
    h = MobilityHandler(guest, fw, clock, MODES["correct"])
    t0 = time.perf_counter()
    rc = h.devicetree_update(1)
    t_apply = time.perf_counter() - t0

    t0 = time.perf_counter()
    rebuilt = load_fdt(dst_blob)
    t_rebuild = time.perf_counter() - t0

    assert rc == 0
    assert canonical(guest.root) == canonical(rebuilt.root)
    touched = len(plan.deletes) + len(plan.updates) + len(plan.adds)
    print(json.dumps({
        "benchmark": "lpm_update",
        "tree_nodes": n_nodes,
        "dtb_bytes": len(dst_blob),
        "touched_nodes": touched,
        "deletes": len(plan.deletes), "updates": len(plan.updates), "adds": len(plan.adds),
        "rtas_calls": len(fw.calls),
        "virtual_rtas_time_s": round(clock.monotonic(), 4),
        "firmware_plan_s": round(t_plan, 3),
        "apply_update_sequence_s": round(t_apply, 3),
        "rebuild_from_fdt_s": round(t_rebuild, 3),
        "apply_vs_rebuild_ratio": round(t_apply / t_rebuild, 3),
        "result_equal": True,
    }, indent=2))


if __name__ == "__main__":
    main()
