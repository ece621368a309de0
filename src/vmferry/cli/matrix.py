"""``vmferry matrix``: the arm64 migration compatibility matrix, computed on the models."""

from __future__ import annotations

import json
import time

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vmferry.analysis.matrix import (
    COMPAT_MODES,
    GUEST_PSCI,
    MITIGATIONS,
    Cell,
    CellSpec,
    MatrixContext,
    run_cell,
    specs,
    to_markdown,
)
from vmferry.analysis.matrix_html import to_html
from vmferry.cli.common import err_console
from vmferry.errors import ConfigError
from vmferry.machine.profiles import list_profiles

PROGRESS_EVERY_S = 3.0


def _run_with_progress(todo: list[CellSpec], lines: bool) -> list[Cell]:
    """Every cell, with progress on stderr: a bar on a terminal, else (with ``lines``) a
    line every few seconds (standard output carries only the matrix)."""
    ctx = MatrixContext()
    out: list[Cell] = []
    if err_console.is_terminal:
        with Progress(TextColumn("matrix"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err_console, transient=True) as bar:
            for spec in bar.track(todo, description="cells"):
                if (cell := run_cell(spec, ctx)) is not None:
                    out.append(cell)
        return out
    last = time.monotonic()
    for i, spec in enumerate(todo, 1):
        if (cell := run_cell(spec, ctx)) is not None:
            out.append(cell)
        if lines and time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            click.echo(f"matrix: {i} of {len(todo)} cells", err=True)
    return out


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("empty list")
    return items


def _check(items: list[str], allowed: tuple[str, ...] | list[str], what: str) -> None:
    unknown = [i for i in items if i not in allowed]
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(allowed)})")


@click.command("matrix")
@click.option("--profiles", help="Comma-separated host profiles (default: every arm64 one).")
@click.option("--guest-psci", default=",".join(GUEST_PSCI), show_default=True,
              help="Guest PSCI choices: default (kernel default), or a version pinned on "
                   "the source.")
@click.option("--mitigations", default=",".join(MITIGATIONS), show_default=True,
              help="Host mitigation levels to enumerate on both sides.")
@click.option("--compat", type=click.Choice(COMPAT_MODES), default="preflight",
              show_default=True)
@click.option("--allow-degraded", is_flag=True,
              help="Pre-flight lets announced mitigation losses through (outcome degraded).")
@click.option("--json", "fmt", flag_value="json", help="A JSON list of cells.")
@click.option("--markdown", "fmt", flag_value="markdown", default=True,
              help="A markdown table (default).")
@click.option("--html", "fmt", flag_value="html",
              help="An HTML page: a coloured source x destination grid per guest PSCI "
                   "setting, with a legend and the reason on each cell.")
def command(profiles: str | None, guest_psci: str, mitigations: str, compat: str,
            allow_degraded: bool, fmt: str) -> None:
    """Every (source, destination, guest PSCI, source and destination mitigation) cell."""
    names = _split(profiles)
    if names is not None:
        _check(names, list_profiles(), "profile")
    psci = _split(guest_psci) or []
    _check(psci, GUEST_PSCI, "guest PSCI choice")
    levels = _split(mitigations) or []
    _check(levels, MITIGATIONS, "mitigation level")
    cells = _run_with_progress(list(specs(names, psci, levels, compat, allow_degraded)),
                               lines=fmt != "json")
    if fmt == "json":
        click.echo(json.dumps([c.to_json() for c in cells], indent=1))
    elif fmt == "html":
        click.echo(to_html(cells), nl=False)
    else:
        click.echo(to_markdown(cells), nl=False)
