"""``vmferry job`` and ``vmferry migrate``: start, follow and cancel migrations."""

from __future__ import annotations

import sys
import time
from typing import Any, cast

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from vmferry.cli.common import JSON_OPTION, client, console, emit_json, esc, human_bytes
from vmferry.host.client import HostClient

FINISHED = ("completed", "failed", "cancelled")


def watch(c: HostClient, job_id: str, show_progress: bool) -> dict[str, Any]:
    """Poll a job until it finishes; a progress bar on a terminal."""
    if not show_progress:
        while (job := c.get(f"/v1/jobs/{job_id}"))["status"] not in FINISHED:
            time.sleep(0.1)
        return cast(dict[str, Any], job)
    cols = (
        TextColumn("[bold]{task.fields[status]:>9}"),
        BarColumn(),
        TextColumn(
            "{task.percentage:>5.1f}%  pass {task.fields[npass]}  "
            "remaining {task.fields[remaining]}  {task.fields[rate]}"
        ),
        TimeElapsedColumn(),
    )
    with Progress(*cols, console=console, transient=False) as progress:
        task = progress.add_task(
            "migrate", total=1.0, status="setup", npass=1, remaining="?", rate=""
        )
        while True:
            job = c.get(f"/v1/jobs/{job_id}")
            ram = job.get("stats", {}).get("ram", {})
            total = max(ram.get("total", 0), 1)
            done = min(ram.get("transferred", 0) / total, 1.0)
            progress.update(
                task,
                completed=done if job["status"] != "completed" else 1.0,
                status=job["status"],
                npass=len(job.get("stats", {}).get("passes", [])) + 1,
                remaining=human_bytes(ram.get("remaining", 0)),
                rate=f"{ram.get('mbps', 0) / 8:.0f} MB/s",
            )
            if job["status"] in FINISHED:
                return cast(dict[str, Any], job)
            time.sleep(0.1)


def summary(job: dict[str, Any]) -> None:
    st = job.get("stats", {})
    if job["status"] != "completed":
        console.print(f"[red]{esc(job['status'])}[/] at {esc(job.get('step') or '?')}: "
                      f"{esc(job.get('error'))}")
        return
    ram = st.get("ram", {})
    for warning in st.get("warnings", []):
        console.print(f"[yellow]warning[/]: {esc(warning)}")
    console.print(
        f"[green]completed[/]: total {st.get('total-time', 0):.0f} ms, "
        f"downtime {st.get('downtime', 0):.1f} ms, {len(st.get('passes', []))} passes, "
        f"{human_bytes(ram.get('transferred', 0))} sent"
    )


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
@click.option("--fault", default=None, metavar="PHASE:ACTION", hidden=True)
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
    fault: str | None,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Live-migrate VM from one host to another."""
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
    if fault:
        params["fault"] = fault
    c = client(src)
    job = c.post(f"/v1/vms/{vm}/migrate", {"destination": dst, "params": params})
    if not no_wait:
        job = watch(c, job["id"], show_progress=not as_json and sys.stdout.isatty())
    if as_json:
        emit_json(job)
    else:
        summary(job) if not no_wait else console.print(f"job {esc(job['id'])} started")
    if not no_wait and job["status"] != "completed":
        sys.exit(1)


@click.group("job")
def command() -> None:
    """Show, follow and cancel migration jobs."""


@command.command("show")
@click.option("--host", "host_url", required=True, metavar="URL")
@click.argument("job_id", required=False)
@JSON_OPTION
def show(host_url: str, job_id: str | None, as_json: bool) -> None:
    """Show one job, or list them all."""
    c = client(host_url)
    data = c.get(f"/v1/jobs/{job_id}") if job_id else c.get("/v1/jobs")
    if as_json:
        emit_json(data)
        return
    for job in data if isinstance(data, list) else [data]:
        console.print(
            f"[bold]{esc(job['id'])}[/] {esc(job['role']):<11} {esc(job['vm']):<16} "
            f"{esc(job['status'])}"
            + (f"  ({esc(job['step'])}: {esc(job['error'])})" if job.get("error") else "")
        )


@command.command("watch")
@click.option("--host", "host_url", required=True, metavar="URL")
@click.argument("job_id")
@JSON_OPTION
def watch_cmd(host_url: str, job_id: str, as_json: bool) -> None:
    """Follow a job until it finishes."""
    job = watch(client(host_url), job_id, show_progress=not as_json and sys.stdout.isatty())
    emit_json(job) if as_json else summary(job)
    if job["status"] != "completed":
        sys.exit(1)


@command.command("cancel")
@click.option("--host", "host_url", required=True, metavar="URL")
@click.argument("job_id")
@JSON_OPTION
def cancel(host_url: str, job_id: str, as_json: bool) -> None:
    """Cancel a running migration; the source VM keeps running."""
    c = client(host_url)
    c.post(f"/v1/jobs/{job_id}/cancel")
    job = watch(c, job_id, show_progress=False)
    emit_json(job) if as_json else summary(job)
