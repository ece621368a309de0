"""``vmferry job`` and ``vmferry migrate``: start, follow and cancel migrations."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from vmferry.cli.common import (
    HOST_OPTION,
    JSON_OPTION,
    client,
    console,
    emit_json,
    err_console,
    esc,
)
from vmferry.cli.progress import (
    Detached,
    bw_text,
    detach_message,
    follow,
    follow_with_interrupt,
    job_info_table,
    limit_text,
    pass_table,
    passes_of,
    print_summary,
    whereabouts,
)
from vmferry.host.outcome import Exit, verdict


def _finish(job: dict[str, Any], as_json: bool, cancelled: bool = False,
            source_url: str = "") -> None:
    """Print the job's end (JSON or words) and exit with its verdict's code."""
    if as_json:
        emit_json(job)
        code = verdict(job).code
    else:
        code = print_summary(job).code
    if cancelled:
        err_console.print(whereabouts(job, source_url), highlight=False)
        if job.get("status") != "completed":
            code = Exit.INTERRUPTED
    sys.exit(int(code))


def _follow(url: str, job_id: str, as_json: bool, cancel: bool) -> tuple[dict[str, Any], bool]:
    terminal = console.is_terminal
    try:
        return follow_with_interrupt(url, job_id, live=terminal and not as_json,
                                     lines=not terminal and not as_json, cancel=cancel)
    except Detached:
        err_console.print(detach_message(url, job_id), highlight=False)
        sys.exit(int(Exit.INTERRUPTED))


@click.command("migrate")
@click.argument("vm")
@click.option("--from", "src", required=True, metavar="URL", help="source host control URL")
@click.option("--to", "dst", required=True, metavar="URL", help="destination host control URL")
@click.option(
    "--downtime-limit",
    "downtime",
    type=float,
    default=300.0,
    show_default=True,
    metavar="MS",
    help="maximum acceptable downtime",
)
@click.option(
    "--max-bandwidth",
    "bandwidth",
    type=float,
    default=None,
    metavar="MIBPS",
    help="cap the migration bandwidth (MiB/s)",
)
@click.option("--offline", is_flag=True, help="pause the VM first and copy it once")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="compare RAM and vCPU digests at switchover",
)
@click.option(
    "--stream-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="also write the exact stream sent to this file (in the source host's images "
    "directory)",
)
@click.option(
    "--compat",
    type=click.Choice(["preflight", "qemu"]),
    default="preflight",
    show_default=True,
    help="preflight: refuse before anything moves what the destination cannot take; "
    "qemu: no pre-flight, failures show while the destination loads (as QEMU)",
)
@click.option(
    "--allow-degraded",
    is_flag=True,
    help="let pre-flight proceed, with a warning, where the guest would lose a mitigation",
)
@click.option(
    "--parallel",
    type=click.IntRange(0, 16),
    default=None,
    metavar="N",
    help="move RAM over N parallel data connections (0: in the main connection; "
    "default: the source host's, see docs/performance.md)",
)
@click.option("--fault", default=None, metavar="PHASE:ACTION", hidden=True)
@click.option("--undefinesource", "undefine_source", is_flag=True,
              help="forget the VM on the source host once it runs on the destination")
@click.option("--no-wait", is_flag=True, help="return once the job started")
@JSON_OPTION
def migrate(
    vm: str,
    src: str,
    dst: str,
    downtime: float,
    bandwidth: float | None,
    offline: bool,
    verify: bool,
    stream_file: str | None,
    compat: str,
    allow_degraded: bool,
    parallel: int | None,
    fault: str | None,
    undefine_source: bool,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Live-migrate VM from one host to another.

    Exit status: 0 completed; 1 failed or cancelled (the VM stays on the source); 3
    completed but the destination reported a problem; 130 interrupted (Ctrl-C cancels
    the migration, a second Ctrl-C detaches and leaves it running)."""
    params: dict[str, Any] = {
        "downtime_limit_ms": downtime,
        "offline": offline,
        "verify": verify,
        "compat": compat,
        "allow_degraded": allow_degraded,
    }
    if bandwidth is not None:
        params["max_bandwidth_mib"] = bandwidth
    if stream_file:
        params["stream_file"] = stream_file
    if parallel is not None:
        params["parallel"] = parallel
    if fault:
        params["fault"] = fault
    if undefine_source:
        params["undefine_source"] = True
    job = client(src).post(f"/v1/vms/{vm}/migrate", {"destination": dst, "params": params})
    if no_wait:
        emit_json(job) if as_json else console.print(f"job {job['id']} started")
        return
    job, cancelled = _follow(src, job["id"], as_json, cancel=True)
    _finish(job, as_json, cancelled, src)


@click.group("job")
def command() -> None:
    """Show, follow and cancel migration jobs."""


@command.command("show")
@HOST_OPTION
@click.argument("job_id", required=False)
@JSON_OPTION
def show(host_url: str, job_id: str | None, as_json: bool) -> None:
    """Show one job's statistics (as virsh domjobinfo), or list the jobs."""
    c = client(host_url)
    data = c.get(f"/v1/jobs/{job_id}") if job_id else c.get("/v1/jobs")
    if as_json:
        emit_json(data)
    elif isinstance(data, dict):
        console.print(job_info_table(data))
        if passes_of(data):
            console.print(pass_table(data, title="pre-copy passes"))
        v = verdict(data)
        for w in v.warnings:
            console.print(f"[yellow]warning[/]: {esc(w)}", highlight=False)
        for p in v.problems:
            console.print(f"[red]problem[/]: {esc(p)}", highlight=False)
    else:
        console.print(job_list_table(data))
        for line in job_problems(data):
            console.print(esc(line), highlight=False, soft_wrap=True)


def job_list_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table("job", "role", "vm", "status", "passes", "downtime")
    table.columns[0].no_wrap = True
    for job in jobs:
        st = job.get("stats", {})
        source = job["role"] == "source"
        table.add_row(
            *(Text(str(x)) for x in (job["id"], job["role"], job["vm"], job["status"])),
            str(len(passes_of(job)) if source else st.get("passes", "")),
            f"{st['downtime']:.1f} ms" if source and job["status"] == "completed" else "")
    return table


def job_problems(jobs: list[dict[str, Any]]) -> list[str]:
    """One line per job that failed or reported a problem or warning (below the table,
    where long messages stay whole)."""
    out: list[str] = []
    for job in jobs:
        if job["status"] == "completed":
            v = verdict(job)
            out += [f"{job['id']}: {w}" for w in v.problems + v.warnings]
        elif job.get("error"):
            out.append(f"{job['id']}: {job['status']} at {job.get('step')}: {job['error']}")
    return out


@command.command("watch")
@HOST_OPTION
@click.argument("job_id")
@click.option("--cancel-on-interrupt", is_flag=True,
              help="Ctrl-C cancels the job (a second Ctrl-C detaches); without it, Ctrl-C "
              "only stops watching")
@JSON_OPTION
def watch_cmd(host_url: str, job_id: str, cancel_on_interrupt: bool, as_json: bool) -> None:
    """Follow a job until it finishes (exit status as for migrate)."""
    job, cancelled = _follow(host_url, job_id, as_json, cancel=cancel_on_interrupt)
    _finish(job, as_json, cancelled, host_url)


@command.command("cancel")
@HOST_OPTION
@click.argument("job_id")
@JSON_OPTION
def cancel(host_url: str, job_id: str, as_json: bool) -> None:
    """Cancel a running migration and wait until it settled; the source VM keeps running."""
    c = client(host_url)
    c.post(f"/v1/jobs/{job_id}/cancel")
    if as_json:
        job = follow(host_url, job_id, live=False, lines=False)
        emit_json(job)
        return
    if console.is_terminal:
        with err_console.status(f"cancelling job {job_id} ..."):
            job = follow(host_url, job_id, live=False, lines=False)
    else:
        print(f"cancelling job {job_id} ...", flush=True)
        job = follow(host_url, job_id, live=False, lines=False)
    console.print(f"job {job_id} {job['status']}"
                  + (f" at {job['step']}" if job.get("step") else ""), highlight=False)
    console.print(whereabouts(job, host_url), highlight=False)


@command.command("set")
@HOST_OPTION
@click.argument("job_id")
@click.option("--downtime-limit", "downtime", type=click.FloatRange(min=0, min_open=True),
              default=None, metavar="MS", help="new downtime limit (virsh migrate-setmaxdowntime)")
@click.option("--max-bandwidth", "bandwidth", type=click.FloatRange(min=0), default=None,
              metavar="MIBPS", help="new bandwidth cap in MiB/s, 0 for unlimited "
              "(virsh migrate-setspeed)")
@JSON_OPTION
def set_cmd(host_url: str, job_id: str, downtime: float | None, bandwidth: float | None,
            as_json: bool) -> None:
    """Change a running migration's downtime limit and bandwidth cap."""
    changes: dict[str, Any] = {}
    if downtime is not None:
        changes["downtime_limit_ms"] = downtime
    if bandwidth is not None:
        changes["max_bandwidth_mib"] = bandwidth or None
    if not changes:
        raise click.UsageError("give --downtime-limit and/or --max-bandwidth")
    job = client(host_url).post(f"/v1/jobs/{job_id}/params", changes)
    if as_json:
        emit_json(job)
        return
    console.print(f"job {job_id}: downtime limit {limit_text(job)}, bandwidth "
                  f"{bw_text(job)}", highlight=False)


@command.command("report")
@HOST_OPTION
@click.argument("job_id")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write an HTML page with the charts (inline SVG)")
@click.option("--png", "png_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write the charts as a PNG image")
def report(host_url: str, job_id: str, html_file: Path | None, png_file: Path | None) -> None:
    """Chart a migration's passes: bytes sent, bandwidth against dirty rate, expected
    downtime against the limit, throttle."""
    if html_file is None and png_file is None:
        raise click.UsageError("give --html FILE and/or --png FILE")
    from vmferry.cli.charts import write_html, write_png  # matplotlib: only when asked

    job = client(host_url).get(f"/v1/jobs/{job_id}")
    if html_file is not None:
        write_html(job, html_file)
        console.print(f"wrote {html_file}", highlight=False)
    if png_file is not None:
        write_png(job, png_file)
        console.print(f"wrote {png_file}", highlight=False)
