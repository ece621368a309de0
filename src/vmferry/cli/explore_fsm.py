"""``vmferry explore fsm``: every VFIO migration path per capability set, and its rules.

Formatting only: paths come from :func:`vmferry.hw.vfio.fsm.path`, rule checks from
:func:`vmferry.hw.vfio.fsm.path_rule_violations`, the graph from ``fsm.dot_graph``.
"""

from __future__ import annotations

import json

import click

from vmferry.errors import NonTermination
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.fsm import (
    FSM_MODES,
    FsmMode,
    arcs_for,
    dot_graph,
    path,
    path_rule_violations,
    states_for,
)
from vmferry.hw.vfio.states import VALID_FLAG_SETS, MigrationFlags

_FLAG_NAMES = {"stop_copy": MigrationFlags.STOP_COPY, "p2p": MigrationFlags.P2P,
               "pre_copy": MigrationFlags.PRE_COPY}  # fmt: skip


def parse_flags(text: str) -> MigrationFlags:
    flags = MigrationFlags(0)
    for word in filter(None, (w.strip().lower() for w in text.split(","))):
        if word not in _FLAG_NAMES:
            raise click.BadParameter(f"unknown flag {word!r}; use {', '.join(_FLAG_NAMES)}")
        flags |= _FLAG_NAMES[word]
    if flags not in VALID_FLAG_SETS:
        raise click.BadParameter(f"{text!r} is not a flag set the uAPI defines "
                                 "(stop_copy is mandatory)")  # fmt: skip
    return flags


def flag_label(flags: int) -> str:
    return "|".join(f.name or "" for f in MigrationFlags if f & flags)


def describe(flags: MigrationFlags, mode: FsmMode) -> dict[str, object]:
    """Every (from, to) pair of ``flags`` with its path or error and its rule checks."""
    pairs: list[dict[str, object]] = []
    for cur in states_for(flags):
        for new in states_for(flags):
            entry: dict[str, object] = {"from": cur.name, "to": new.name, "path": None,
                                        "error": None, "violations": []}  # fmt: skip
            try:
                hops = path(flags, cur, new, mode=mode)
            except VfioError as exc:
                entry["error"] = exc.errno_name
            except NonTermination as exc:
                entry["error"] = f"non-termination: {exc}"
            else:
                entry["path"] = [h.name for h in hops]
                entry["violations"] = path_rule_violations(flags, cur, new, hops)
            pairs.append(entry)
    return {
        "flags": int(flags),
        "label": flag_label(flags),
        "mode": mode,
        "states": [s.name for s in states_for(flags)],
        "arcs": [[a.name, b.name] for a, b in arcs_for(flags)],
        "pairs": pairs,
        "rules_ok": all(not p["violations"] for p in pairs),
        "non_terminating": sum(str(p["error"]).startswith("non-termination") for p in pairs),
    }


def _text(report: dict[str, object]) -> str:
    pairs = report["pairs"]
    assert isinstance(pairs, list)
    arcs = report["arcs"]
    assert isinstance(arcs, list)
    verdict = "ok" if report["rules_ok"] else "VIOLATED"
    if report["non_terminating"]:
        verdict += f", {report['non_terminating']} request(s) never terminate"
    lines = [f"flags {report['flags']:#x} ({report['label']}), mode {report['mode']}: "
             f"{len(arcs)} arcs, {len(pairs)} pairs, path rules {verdict}"]  # fmt: skip
    for p in pairs:
        shown = " > ".join(p["path"]) or "no-op" if p["path"] is not None else str(p["error"])
        bad = f"   !! {'; '.join(p['violations'])}" if p["violations"] else ""
        lines.append(f"  {p['from']:>12} -> {p['to']:<12} {shown}{bad}")
    return "\n".join(lines)


@click.command("fsm")
@click.option(
    "--flags",
    "flag_text",
    default=None,
    help="capability set, e.g. stop_copy,p2p,pre_copy (default: all four)",
)
@click.option(
    "--mode",
    type=click.Choice(FSM_MODES),
    default="fixed",
    show_default=True,
    help="step algorithm: the fixed kernel or the pre-2026 loop",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--dot", "as_dot", is_flag=True, help="Graphviz arc graph of each flag set")
def fsm_command(flag_text: str | None, mode: str, as_json: bool, as_dot: bool) -> None:
    """Every VFIO migration state path per capability set, checked against the uAPI rules."""
    if as_json and as_dot:
        raise click.UsageError("--json and --dot are exclusive")
    flag_sets = [parse_flags(flag_text)] if flag_text else list(VALID_FLAG_SETS)
    fsm_mode: FsmMode = "fixed" if mode == "fixed" else "error_sentinel_loop"
    if as_dot:
        click.echo("".join(dot_graph(f) for f in flag_sets), nl=False)
        return
    reports = [describe(f, fsm_mode) for f in flag_sets]
    if as_json:
        click.echo(json.dumps({"flag_sets": reports}, indent=2))
    else:
        click.echo("\n\n".join(_text(r) for r in reports))
    if not all(r["rules_ok"] and not r["non_terminating"] for r in reports):
        raise click.exceptions.Exit(1)


command = fsm_command
