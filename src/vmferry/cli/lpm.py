"""``vmferry lpm``: pseries device trees and the post-migration update sequence, offline.

``lpm tree`` writes the tree a pseries VM is created with; ``lpm plan`` shows what the
destination firmware would send (update-nodes deletes/updates/adds) between two platform
trees; ``lpm apply`` runs the guest's update handler on a guest tree and prints the report.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.table import Table

from vmferry.cli.common import JSON_OPTION, console, emit_json, esc
from vmferry.clock import ManualClock
from vmferry.guest.mobility import MODES, MobilityReport, run_post_migration_updates
from vmferry.hw.devtree.fdt import FdtDecodeError, dump_fdt, load_fdt
from vmferry.hw.devtree.tree import DeviceTree
from vmferry.hw.spapr.platform import generate_pseries_tree
from vmferry.hw.spapr.rtas import compute_update_plan

DTB = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("lpm")
def command() -> None:
    """pseries Live Partition Mobility device-tree updates."""


def _load(path: Path) -> DeviceTree:
    try:
        return load_fdt(path.read_bytes())
    except FdtDecodeError as exc:
        click.echo(f"vmferry: {path}: {exc}", err=True)
        sys.exit(2)


@command.command("tree")
@click.option("--memory-mib", type=int, default=1024, show_default=True)
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--numa-domain", type=int, default=0, show_default=True)
@click.option("--l2-size", type=int, default=512 * 1024, show_default=True)
@click.option("--no-platform-facilities", is_flag=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def tree(memory_mib: int, vcpus: int, numa_domain: int, l2_size: int,
         no_platform_facilities: bool, output: Path) -> None:
    """Write the .dtb a pseries VM of this shape boots with."""
    t = generate_pseries_tree(memory_mib, vcpus, numa_domain=numa_domain, l2_size=l2_size,
                              platform_facilities=not no_platform_facilities)
    output.write_bytes(dump_fdt(t))
    console.print(f"{output}: {sum(1 for _ in t.walk())} nodes")


@command.command("plan")
@click.argument("source", type=DTB)
@click.argument("destination", type=DTB)
@JSON_OPTION
def plan(source: Path, destination: Path, as_json: bool) -> None:
    """What the DESTINATION platform's firmware reports after a move from SOURCE."""
    src, dst = _load(source), _load(destination)
    p = compute_update_plan(src, dst)
    data: dict[str, Any] = {
        "delete": [{"phandle": f"{ph:#x}", "path": path}
                   for ph, path in zip(p.deletes, p.delete_paths, strict=True)],
        "update": [{"phandle": f"{u.phandle:#x}", "path": u.path,
                    "properties": [c.name for c in u.changes]} for u in p.updates],
        "add": [{"parent": f"{a.parent_phandle:#x}", "drc_index": f"{a.drc_index:#x}",
                 "node": a.subtree.name, "nodes": a.subtree.count()} for a in p.adds],
    }
    if as_json:
        emit_json(data)
        return
    _show_plan(data, source, destination)


def _show_plan(data: dict[str, list[dict[str, Any]]], source: Path, destination: Path) -> None:
    """The plan as a table, in the order the firmware sends it: deletes, updates, adds."""
    counts = ", ".join(f"{len(rows)} {kind}{'s' if len(rows) != 1 else ''}"
                       for kind, rows in data.items())
    console.print(f"update-nodes plan {esc(source.name)} -> {esc(destination.name)}: "
                  f"{counts}", highlight=False)
    if not any(data.values()):
        console.print("the trees match: nothing to update", highlight=False)
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("action")
    table.add_column("phandle", justify="right")  # of the parent, for an add
    table.add_column("node", overflow="fold")
    table.add_column("what", overflow="fold")
    for row in data["delete"]:
        table.add_row("delete", row["phandle"], esc(row["path"]), "")
    for row in data["update"]:
        props = row["properties"]
        table.add_row("update", row["phandle"], esc(row["path"]),
                      esc("\n".join(props)) if props else "(no property changes)")
    for row in data["add"]:
        table.add_row("add", row["parent"], esc(row["node"]),
                      f"{row['nodes']} node{'s' if row['nodes'] != 1 else ''}, "
                      f"DRC {row['drc_index']}")
    console.print(table)


def _report_json(r: MobilityReport) -> dict[str, Any]:
    return {
        "rc": r.rc, "ok": r.ok,
        "changes": [{"kind": c.kind, "path": c.path, "property": c.prop} for c in r.changes],
        "notices": r.notices, "warnings": r.warnings, "errors": r.errors,
        "hazards": [{"hazard": h.hazard, "node": h.node, "holder": h.holder,
                     "message": h.message} for h in r.hazards],
        "leaks": [{"node": x.node, "state": x.state, "holders": dict(x.holders)}
                  for x in r.leaks],
        "exposure_window_s": r.exposure_window_s,
    }


@command.command("apply")
@click.argument("guest", type=DTB)
@click.argument("source", type=DTB)
@click.argument("destination", type=DTB)
@click.option("--mode", type=click.Choice(sorted(MODES)), default="correct", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path))
@JSON_OPTION
def apply(guest: Path, source: Path, destination: Path, mode: str, output: Path | None,
          as_json: bool) -> None:
    """Run the guest's post-migration update on GUEST (moved from SOURCE to DESTINATION)."""
    g = _load(guest)
    rep = run_post_migration_updates(g, _load(source), _load(destination), mode, ManualClock())
    if output is not None:
        output.write_bytes(dump_fdt(g))
    data = _report_json(rep)
    if as_json:
        emit_json(data)
    else:
        for c in rep.changes:
            console.print(f"{c.kind:16} {esc(c.path)} {esc(c.prop)}")
        for h in rep.hazards:
            console.print(f"[red]{esc(h.hazard)}[/] {esc(h.node)} ({esc(h.holder)}): "
                          f"{esc(h.message)}")
        for leak in rep.leaks:
            console.print(f"[yellow]leak[/] {esc(leak.node)} {esc(leak.state)} "
                          f"{esc(dict(leak.holders))}")
        console.print(f"rc={rep.rc} exposure window {rep.exposure_window_s * 1000:.1f} ms")
    if not rep.ok:
        sys.exit(1)
