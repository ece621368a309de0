"""``vmferry vm``: create, list, show, start, pause, destroy VMs on a host; export a
pseries VM's device tree (``vm dtb``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from vmferry.cli.common import (
    HOST_OPTION,
    JSON_OPTION,
    client,
    console,
    emit_json,
    esc,
    human_bytes,
)
from vmferry.machine.vm import load_definition


@click.group("vm")
def command() -> None:
    """Manage VMs on a host."""


def _show(vm: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(vm)
        return
    d = vm["definition"]
    console.print(
        f"[bold]{esc(vm['name'])}[/]  {esc(vm['runstate'])}  arch={esc(d['arch'])}  "
        f"memory={esc(d['memory_mib'])} MiB  vcpus={esc(d['vcpus'])}"
        + (f"  backend={esc(vm['backend'])}" if "backend" in vm else "")
    )
    g = vm.get("guest")
    if g:
        console.print(
            f"  guest progress {g['progress']} ({g['progress_per_s']:g}/s), "
            f"{g['exits_per_s']:g} exits/s, dirty log {g['dirty_log']}: "
            f"{g['dirty_log_reads']} reads, {g['dirty_rate_mbps']:g} MB/s seen"
            + (f"; CRASHED: {esc(g['crashed'])}" if g.get("crashed") else "")
        )
    if "digests" in vm:
        digests = vm["digests"]
        console.print(f"  ram digest  {esc(digests['ram'])}\n  vcpu digest "
                      f"{esc(digests['vcpu'])}")


@command.command("create")
@HOST_OPTION
@click.argument("definition", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--start/--no-start", default=True, show_default=True)
@JSON_OPTION
def create(host_url: str, definition: Path, start: bool, as_json: bool) -> None:
    """Create a VM from a TOML definition file."""
    parsed = load_definition(definition)
    vm = client(host_url).post("/v1/vms", {"definition": parsed.to_dict(), "start": start})
    _show(vm, as_json)


@command.command("list")
@HOST_OPTION
@JSON_OPTION
def list_(host_url: str, as_json: bool) -> None:
    """List the host's VMs."""
    vms = client(host_url).get("/v1/vms")
    if as_json:
        emit_json(vms)
        return
    table = Table("name", "state", "arch", "memory", "vcpus")
    for vm in vms:
        d = vm["definition"]
        table.add_row(
            esc(vm["name"]),
            esc(vm["runstate"]),
            esc(d["arch"]),
            human_bytes(d["memory_mib"] * 1024 * 1024),
            str(d["vcpus"]),
        )
    console.print(table)


@command.command("show")
@HOST_OPTION
@click.argument("name")
@click.option("--digest", is_flag=True, help="also compute RAM and vCPU digests")
@JSON_OPTION
def show(host_url: str, name: str, digest: bool, as_json: bool) -> None:
    """Show one VM."""
    _show(client(host_url).get(f"/v1/vms/{name}" + ("?digest=1" if digest else "")), as_json)


@command.command("start")
@HOST_OPTION
@click.argument("name")
@JSON_OPTION
def start(host_url: str, name: str, as_json: bool) -> None:
    """Run a paused VM."""
    _show(client(host_url).post(f"/v1/vms/{name}/start"), as_json)


@command.command("pause")
@HOST_OPTION
@click.argument("name")
@JSON_OPTION
def pause(host_url: str, name: str, as_json: bool) -> None:
    """Pause a VM's vCPUs."""
    _show(client(host_url).post(f"/v1/vms/{name}/pause"), as_json)


@command.command("destroy")
@HOST_OPTION
@click.argument("name")
@JSON_OPTION
def destroy(host_url: str, name: str, as_json: bool) -> None:
    """Destroy a VM and free its memory."""
    out = client(host_url).delete(f"/v1/vms/{name}")
    emit_json(out) if as_json else console.print(f"destroyed {esc(name)}")


@command.command("save")
@HOST_OPTION
@click.argument("name")
@click.argument("file")
@JSON_OPTION
def save(host_url: str, name: str, file: str, as_json: bool) -> None:
    """Save a VM to FILE as a vmferry stream; it keeps running.  FILE is a path in the
    host's images directory (relative to it, or absolute inside it)."""
    out = client(host_url).post(f"/v1/vms/{name}/save", {"path": file})
    if as_json:
        emit_json(out)
    else:
        console.print(f"saved {esc(name)} to {esc(out['path'])} "
                      f"({human_bytes(out['bytes'])})")


@command.command("restore")
@HOST_OPTION
@click.argument("file")
@click.option("--start/--paused", default=True, show_default=True)
@JSON_OPTION
def restore(host_url: str, file: str, start: bool, as_json: bool) -> None:
    """Restore a VM from a stream FILE in the host's images directory."""
    out = client(host_url).post("/v1/restore", {"path": file, "start": start})
    emit_json(out) if as_json else console.print(f"restored {esc(out['vm'])} "
                                                 f"({esc(out['runstate'])})")


@command.command("dtb")
@HOST_OPTION
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the .dtb here (default: standard output)")
def dtb(host_url: str, name: str, output: Path | None) -> None:
    """Export a pseries VM's current device tree as a flattened tree (.dtb)."""
    blob = client(host_url).request_bytes("GET", f"/v1/vms/{name}/dtb")
    if output is None:
        sys.stdout.buffer.write(blob)
        sys.stdout.buffer.flush()
        return
    try:
        output.write_bytes(blob)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror}") from exc
    click.echo(f"wrote {output} ({len(blob)} bytes)", err=True)
