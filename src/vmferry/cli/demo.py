"""``vmferry demo``: a live migration between two local host daemons, proven."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table

from vmferry.cli.common import console, emit_json, esc, human_bytes
from vmferry.cli.progress import mib_per_s
from vmferry.host.demo import DemoOptions, run_demo


@click.command("demo")
@click.option("--memory-mib", type=click.IntRange(16, 65536), default=1024, show_default=True)
@click.option(
    "--fill",
    type=click.Choice(["zero", "random", "mixed"]),
    default="mixed",
    show_default=True,
    help="initial RAM contents",
)
@click.option(
    "--dirty-rate-mbps",
    type=click.FloatRange(0),
    default=20.0,
    show_default=True,
    help="guest dirty rate in MB/s, 10^6 bytes per second (0 = idle guest)",
)
@click.option(
    "--downtime-limit", type=click.FloatRange(1), default=300.0, show_default=True, metavar="MS"
)
@click.option(
    "--stream-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="also write the exact stream that was sent",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "kvm", "model"]),
    default="auto",
    show_default=True,
    help="kvm: a real x86_64 guest; model: the simulated guest; auto: kvm where usable",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(
    memory_mib: int,
    fill: str,
    dirty_rate_mbps: float,
    downtime_limit: float,
    stream_file: str | None,
    backend: str,
    as_json: bool,
) -> None:
    """Start two hosts, live-migrate a VM between them and prove the result."""
    opts = DemoOptions(
        memory_mib=memory_mib,
        fill=fill,
        dirty_rate_mbps=dirty_rate_mbps,
        downtime_limit_ms=downtime_limit,
        stream_file=stream_file,
        backend=backend,
    )
    report = run_demo(
        opts, say=(lambda s: None) if as_json else (lambda s: console.print(f"[dim]>[/] {s}"))
    )
    if as_json:
        emit_json(report)
    else:
        _print(report)
    sys.exit(0 if report["status"] == "completed" and report["verified"] else 1)


def _print(r: dict[str, Any]) -> None:
    if r["status"] != "completed":
        console.print(f"[red]migration {esc(r['status'])}[/] at {esc(r['step'])}: "
                      f"{esc(r['error'])}")
        return
    t = Table("pass", "pages", "zero", "sent", "ms", "MiB/s", "dirtied", "exp. ms", "thr.",
              title="pre-copy passes (exp. ms: expected downtime; thr.: auto-converge)")
    for p in r["passes"]:
        t.add_row(str(p["number"]), str(p["pages"]), str(p["duplicate"]),
                  human_bytes(p["bytes"]), f"{p['seconds'] * 1e3:.0f}",
                  f"{mib_per_s(p['mbps']):.0f}", str(p["dirty_pages"]),
                  f"{p['expected_downtime_ms']:.1f}", f"{p['throttle_pct']}%")
    console.print(t)
    ram, b = r["ram"], r["downtime-breakdown"]
    console.print(
        f"setup {r['setup-time']:.1f} ms, total {r['total-time']:.0f} ms; "
        f"[bold]downtime {r['downtime']:.1f} ms[/] (final RAM {b.get('final_ram_ms', 0):.1f}, "
        f"state {b.get('state_ms', 0):.1f}, after the stream {b.get('after_stream_ms', 0):.1f} "
        f"(drain {b.get('drain_ms', 0):.1f}, load {b.get('load_ms', 0):.1f}, round trips "
        f"{b.get('round_trips_ms', 0):.1f}, adopt {b.get('adopt_ms', 0):.1f}); "
        f"verification {b.get('verification_ms', 0):.0f} ms)"
    )
    _print_warnings(r)
    console.print(
        f"RAM {human_bytes(ram['total'])}: {human_bytes(ram['transferred'])} sent, "
        f"{ram['normal']} normal pages, {ram['duplicate']} zero pages, "
        f"{ram['dirty-sync-count']} dirty syncs"
    )
    v = r["verification"]
    ok = "[green]verified[/]" if r["verified"] else "[red]NOT verified[/]"
    console.print(
        f"{ok}: RAM digest equal={v.get('ram_equal')} "
        f"({v.get('source', {}).get('ram', '?')[:16]}...), vCPU registers equal="
        f"{v.get('vcpu_equal')}; destination VM {r['destination_runstate']}"
    )
    _print_devices("demo-vm", r["devices"])
    g = r.get("guest_progress")
    if g is not None:
        mark = "[green]continued[/]" if g["continued"] else "[red]DID NOT continue[/]"
        console.print(f"guest ({r['backend']}): progress {g['before_stop']} when stopped, "
                      f"{g['after_resume']} after the resume on B: {mark}")
    for name, vm in r.get("vms", {}).items():
        ok = "[green]verified[/]" if vm["verified"] else "[red]NOT verified[/]"
        console.print(
            f"{name}: migration {vm['status']}, downtime {vm['downtime']:.1f} ms, "
            f"{vm['iterations']} passes; {ok}"
        )
        _print_warnings(vm)
        _print_devices(name, vm["devices"])


def _print_warnings(r: dict[str, Any]) -> None:
    """What the job warned of (a downtime over its limit): on the terminal, as
    ``migrate`` and ``job show`` print it."""
    for w in r.get("warnings", []):
        console.print(f"[yellow]warning:[/] {esc(w)}")


def _print_devices(vm: str, devices: dict[str, Any]) -> None:
    for ident, d in devices.items():
        mark = "[green]equal[/]" if d["equal"] else "[red]DIFFERENT[/]"
        console.print(
            f"  {vm}/{ident} ({d['driver']}): device state {mark} at switchover "
            f"({d['source_digest'][:16]}...), {d['destination_state']} on the destination"
        )
