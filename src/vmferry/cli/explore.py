"""``vmferry explore``: run race scenarios under the interleaving explorer, replay failures.

Formatting only: the exploring is :func:`vmferry.analysis.explore.run_scenario`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import click
from rich.console import Console
from rich.status import Status
from rich.table import Table

from vmferry.analysis.explore import (
    STRATEGIES,
    ReplayScriptError,
    Report,
    ScheduleMismatch,
    replay,
    run_scenario,
)
from vmferry.analysis.explore.api import Scenario
from vmferry.analysis.explore.runner import DEFAULT, DEFAULT_STRATEGY, ExploreProgress
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.cli.common import err_console, esc
from vmferry.errors import ConfigError


@click.group("explore")
def command() -> None:
    """Explore thread interleavings of the concurrent models."""


@command.command("races")
@click.option("--scenario", "scenario_name", help="Scenario to explore (see --list).")
@click.option("--mode", default=None, help="Model mode (default: the scenario's correct one).")
@click.option("--case", "case_name", default=None, help="Only this case of the scenario.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=DEFAULT_STRATEGY,
              show_default=True, help="dpor, sleep (sleep sets), naive or random walks.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random-walk seed.")
@click.option("--preemption-bound", type=click.IntRange(min=0), default=None,
              help="Preemption bound (default: the scenario's).")
@click.option("--max-schedules", type=click.IntRange(min=1), default=None,
              help="Stop after this many schedules (random: number of walks).")
@click.option("--failures-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where failing schedules are saved (default ./explore-failures).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Explore the cases on N Ray workers (needs: pip install 'vmferry[ray]').")
@click.option("--ray-address", default=None,
              help="Join this Ray cluster instead of starting a local Ray runtime.")
@click.option("--split-depth", type=click.IntRange(min=0), default=0, show_default=True,
              help="Search the subtree below every node at this depth on its own (Ray "
                   "tasks with --workers); the same in one process. 0: split by case only.")
@click.option("--list", "list_only", is_flag=True, help="List scenarios, cases and modes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def races(
    scenario_name: str | None, mode: str | None, case_name: str | None, strategy: str,
    seed: int, preemption_bound: int | None, max_schedules: int | None,
    failures_dir: Path | None, workers: int, ray_address: str | None, split_depth: int,
    list_only: bool, as_json: bool,
) -> None:
    """Explore a scenario; exit 1 when a failing schedule was found."""
    scenarios = all_scenarios()
    if list_only:
        _list(scenarios, as_json)
        return
    if scenario_name is None:
        raise click.UsageError("--scenario is required (or use --list)")
    scenario = scenarios.get(scenario_name)
    if scenario is None:
        raise click.BadParameter(
            f"unknown scenario {scenario_name!r} (known: {', '.join(sorted(scenarios))})",
            param_hint="--scenario",
        )
    what = f"exploring {scenario.name} ({mode or scenario.default_mode}, {strategy})"
    try:
        with ProgressDisplay(what, quiet=as_json) as progress:
            report = run_scenario(
                scenario, mode=mode, case=case_name, strategy=strategy,
                preemption_bound=preemption_bound, seed=seed, max_schedules=max_schedules,
                failures_dir=DEFAULT if failures_dir is None else failures_dir,
                workers=workers, ray_address=ray_address, progress=progress,
                split_depth=split_depth,
            )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        _show(report)
    sys.exit(1 if report.failures else 0)


#: seconds between progress lines when stderr is not a terminal
LINE_EVERY_S = 3.0
#: seconds between refreshes of the terminal display
REFRESH_S = 0.1


class ProgressDisplay:
    """The explorer's progress on stderr: schedules explored, pruned, failing schedules
    found, schedules per second and the case in hand.  On a terminal a spinner line that
    keeps changing; else a line when exploring starts, then one every
    :data:`LINE_EVERY_S` seconds (none at all with ``quiet``, e.g. ``--json`` piped)."""

    def __init__(self, what: str, quiet: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.clock = clock
        self.live = err_console.is_terminal
        self.lines = not self.live and not quiet
        self.started = self.last_shown = clock()
        self.latest: ExploreProgress | None = None
        self._status: Status | None = None

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            self._status = err_console.status(self.what + " ...")
            self._status.start()
        elif self.lines:
            click.echo(self.what + " ...", err=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._status is not None:
            self._status.stop()

    def __call__(self, p: ExploreProgress) -> None:
        self.latest = p
        now = self.clock()
        if self._status is not None:
            if now - self.last_shown >= REFRESH_S:
                self.last_shown = now
                self._status.update(f"{self.what}: {esc(self.describe(p, now))}")
        elif self.lines and now - self.last_shown >= LINE_EVERY_S:
            self.last_shown = now
            click.echo(f"{self.what}: {self.describe(p, now)}", err=True)

    def describe(self, p: ExploreProgress, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        case = f"case {p.case} ({p.case_index}/{p.cases})" if p.cases > 1 else f"case {p.case}"
        return (f"{p.schedules} schedules explored, {p.pruned} pruned, "
                f"{p.failing} failing found, {p.schedules / elapsed:.0f} schedules/s, "
                f"{elapsed:.0f} s, {case}")


@command.command("replay")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def replay_cmd(file: Path, as_json: bool) -> None:
    """Re-run a saved failing schedule.

    Exit 1 when the schedule fails again, 0 when it now runs clean, 2 when the file is
    unusable (unreadable, malformed, or no longer fits the scenario: the reason is printed).
    """
    try:
        result = replay(file)
    except (ReplayScriptError, ScheduleMismatch, ConfigError) as exc:
        if as_json:
            click.echo(json.dumps({"status": "unusable", "reason": str(exc)}))
        else:
            click.echo(f"{file}: unusable replay script: {exc}", err=True)
        sys.exit(2)
    failure = result.failure
    status = "passes" if failure is None else (
        "reproduced" if result.reproduced else "different-failure")
    if as_json:
        click.echo(json.dumps({
            "status": status,
            "scenario": result.scenario, "mode": result.mode, "case": result.case,
            "expected_hazard": result.expected_hazard, "reproduced": result.reproduced,
            "failure": failure.to_json() if failure is not None else None,
        }))
    else:
        console = Console()
        where = f"{result.scenario} / {result.mode} / {result.case}"
        if failure is None:
            console.print(f"[green]{where}: the schedule now passes[/green]")
        else:
            verdict = "reproduced" if result.reproduced else "different failure"
            console.print(f"[red]{where}: {verdict}: {failure.hazard}[/red]")
            console.print(failure.message, markup=False)
            console.print(f"{len(failure.schedule)} steps", markup=False)
    sys.exit(1 if failure is not None else 0)


def _list(scenarios: Mapping[str, Scenario], as_json: bool) -> None:
    items = list(scenarios.values())
    if as_json:
        click.echo(json.dumps({"scenarios": [
            {"name": s.name, "description": s.description, "default_mode": s.default_mode,
             "modes": list(s.modes), "cases": [c.name for c in s.cases],
             "deterministic_modes": sorted(s.deterministic)}
            for s in items
        ]}))
        return
    console = Console()
    for s in items:
        labels = [f"{m} (default)" if m == s.default_mode else m for m in s.modes]
        mode_w = min(max((len(label) for label in labels), default=4),
                     max(console.width - 30, 12))
        table = Table(title=f"{s.name}: {s.description}", title_justify="left")
        # a mode name is what the user types: never cut it (it folds if it must)
        table.add_column("mode", overflow="fold", min_width=mode_w)
        table.add_column("description", max_width=max(console.width - mode_w - 7, 10))
        for mode, label in zip(s.modes, labels, strict=True):
            table.add_row(label, s.mode_help.get(mode, ""))
        console.print(table)
        console.print("cases: " + ", ".join(c.name for c in s.cases), markup=False)


def _show(report: Report) -> None:
    console = Console()
    status = "[red]FAIL[/red]" if report.failures else "[green]ok[/green]"
    console.print(
        f"{status} {report.scenario} mode={report.mode} strategy={report.strategy} "
        f"schedules={report.schedules_explored} pruned={report.pruned} "
        f"(by state {report.pruned_by_state}) "
        f"failing={report.failing_schedules} complete={report.complete} "
        f"{'deterministic=True ' if report.deterministic else ''}"
        f"time={report.elapsed_s:.2f}s"
    )
    for failure in report.failures:
        console.print(f"\n[bold]{failure.case}[/bold]: {failure.hazard}")
        console.print(failure.message, markup=False)
        if failure.path:
            console.print(f"saved: {failure.path}  (vmferry explore replay FILE)", markup=False)
        console.print(failure.script(), markup=False)


def _add_fsm() -> None:
    from vmferry.cli.explore_fsm import fsm_command

    command.add_command(fsm_command)


_add_fsm()
