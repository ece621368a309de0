"""``vmferry vm``: create, list, show, start, pause, destroy VMs on a host; export a
pseries VM's device tree (``vm dtb``)."""

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
    console.print(vm_table(vm))
    for line in report_lines(vm.get("report") or {}):
        console.print(esc(line), highlight=False)
    g = vm.get("guest")
    if g:
        console.print(
            f"guest progress {g['progress']} ({g['progress_per_s']:g}/s), "
            f"{g['exits_per_s']:g} exits/s, dirty log {g['dirty_log']}: "
            f"{g['dirty_log_reads']} reads, {g['dirty_rate_mbps']:g} MB/s seen"
            + (f", {g['dirty_ring_full_exits']} full-ring exits"
               if "dirty_ring_full_exits" in g else "")
            + (f"; CRASHED: {esc(g['crashed'])}" if g.get("crashed") else ""),
            highlight=False,
        )
    if "digests" in vm:
        digests = vm["digests"]
        console.print(f"ram digest  {digests['ram']}\nvcpu digest {digests['vcpu']}")


def vm_table(vm: dict[str, Any]) -> Table:
    """What the VM is: arch, size, devices, workload, throttle (units in each value)."""
    d = vm["definition"]
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    work = d.get("workload") or {}
    rows = [
        ("Name", vm["name"]),
        ("State", vm["runstate"]),
        ("Arch", str(d.get("arch", "generic"))
                 + (f" ({vm['backend']} backend)" if "backend" in vm else "")),
        ("Memory", f"{d['memory_mib']} MiB"),
        ("vCPUs", str(d.get("vcpus", 1))),
        ("Dirty rate", f"{work['dirty_rate_mbps']:g} MB/s, 10^6 bytes/s ("
                       f"{work.get('pattern', 'uniform')} pattern, as defined)"
                       if work.get("dirty_rate_mbps") else "idle guest"),
        ("Throttle", f"{vm.get('throttle_pct', 0)} %"),
        ("Pages dirtied", str(vm.get("pages_dirtied", "-"))),
    ]
    if vm.get("memory_lost"):
        rows.insert(2, ("Memory lost", "yes: rebuilt from its definition after a restart of "
                                       "the host daemon"))
    if vm.get("note"):
        rows.insert(2, ("Note", str(vm["note"])))
    for dev in d.get("devices") or []:
        host = f" on {dev['host_device']}" if dev.get("host_device") else ""
        rows.append(("VFIO device", f"{dev.get('id')} ({dev.get('driver')}){host}"))
    for w in d.get("tce_windows") or []:
        rows.append(("TCE window", f"liobn {w['liobn']:#x} at {w.get('offset', 0):#x}, "
                                   f"{w['size_mib']} MiB, {1 << w.get('page_shift', 12)} B "
                                   "pages"))
    for dev in d.get("dma_devices") or []:
        rows.append(("DMA device", f"{dev.get('name')} on liobn {dev.get('liobn', 0):#x}"))
    for k, v in rows:
        t.add_row(k + ":", Text(v))  # text from the host, never markup
    return t


def report_lines(report: dict[str, Any]) -> list[str]:
    """The handlers' reports in words: firmware and guest view (arm64), TCE windows
    (pseries), device tree check, VFIO devices."""
    out: list[str] = []
    arm = report.get("arm64")
    if isinstance(arm, dict):
        fw, guest = arm.get("firmware", {}), arm.get("guest", {})
        out.append(f"firmware: profile {fw.get('profile')}, PSCI {fw.get('psci_version')}, "
                   f"host mitigation {fw.get('mitigation')} (guest PSCI choice "
                   f"{arm.get('psci_choice')})")
        mit = guest.get("mitigation") or {}
        prot = ", ".join(f"{k} {v}" for k, v in sorted(mit.items())) or "unknown"
        out.append(f"guest: PSCI {guest.get('psci_version')}, SMCCC 1.1 "
                   f"{'yes' if guest.get('smccc_1_1') else 'no'}; protection: {prot}"
                   + (f"; LOST: {', '.join(guest['lost'])}" if guest.get("lost") else ""))
    tce = report.get("spapr-tce")
    if isinstance(tce, dict):
        for w in tce.get("windows", []):
            out.append(f"TCE window {w['liobn']:#x}: {w.get('mapped', 0)} of "
                       f"{w.get('entries', 0)} entries mapped")
        out.append(f"TCE: {tce.get('dma_faults', 0)} DMA faults, invariants "
                   f"{tce.get('invariants')}")
    dt = report.get("pseries-dt")
    if isinstance(dt, dict):
        check = dt.get("check")
        if check == "ok" or not isinstance(check, list):
            out.append(f"device tree: check {check}")
        else:
            out.append(f"device tree: {len(check)} problems: " + "; ".join(map(str, check[:3]))
                       + ("; ..." if len(check) > 3 else ""))
    vfio = report.get("vfio")
    if isinstance(vfio, dict):
        for ident, dev in sorted((vfio.get("devices") or {}).items()):
            out.append(f"VFIO {ident} ({dev.get('driver')}): {dev.get('state')}, "
                       f"{dev.get('dma_writes', 0)} DMA writes")
    return out


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
@click.option("--force", is_flag=True, help="replace FILE if it exists")
@JSON_OPTION
def save(host_url: str, name: str, file: str, force: bool, as_json: bool) -> None:
    """Save a VM to FILE as a vmferry stream; it keeps running.  FILE is a path in the
    host's images directory (relative to it, or absolute inside it); an existing FILE is
    refused unless --force is given."""
    out = client(host_url).post(f"/v1/vms/{name}/save", {"path": file, "force": force})
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
