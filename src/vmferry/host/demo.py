"""The demo: two host daemons on 127.0.0.1, one VM, one live migration, proven."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.host.client import HostClient
from vmferry.host.processes import HostProcess, spawn_host


@dataclass
class DemoOptions:
    memory_mib: int = 1024
    vcpus: int = 2
    fill: str = "mixed"
    dirty_rate_mbps: float = 20.0
    pattern: str = "hot"
    downtime_limit_ms: float = 300.0
    stream_file: str | None = None
    warmup_s: float = 0.5
    extra_definition: dict[str, Any] = field(default_factory=dict)


def run_demo(opts: DemoOptions, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the whole demo; returns the report.  Daemons are stopped on every exit path."""
    workdir = Path(tempfile.mkdtemp(prefix="vmferry-demo-"))
    hosts: list[HostProcess] = []
    try:
        say("starting host daemons A and B on 127.0.0.1")
        hosts.append(spawn_host("A", workdir / "A"))
        hosts.append(spawn_host("B", workdir / "B"))
        a, b = (HostClient(h.control_url) for h in hosts)
        definition = {
            "name": "demo-vm",
            "arch": "generic",
            "memory_mib": opts.memory_mib,
            "vcpus": opts.vcpus,
            "fill": opts.fill,
            "workload": {"dirty_rate_mbps": opts.dirty_rate_mbps, "pattern": opts.pattern},
            **opts.extra_definition,
        }
        say(
            f"creating demo-vm on A: {opts.memory_mib} MiB, {opts.vcpus} vCPUs, "
            f"fill={opts.fill}, dirtying {opts.dirty_rate_mbps:g} MB/s"
        )
        a.post("/v1/vms", {"definition": definition, "start": True})
        time.sleep(opts.warmup_s)
        params: dict[str, Any] = {"downtime_limit_ms": opts.downtime_limit_ms, "verify": True}
        if opts.stream_file:
            params["stream_file"] = str(Path(opts.stream_file).resolve())
        say(f"live-migrating demo-vm A -> B (downtime limit {opts.downtime_limit_ms:g} ms)")
        job = a.post(
            "/v1/vms/demo-vm/migrate", {"destination": hosts[1].control_url, "params": params}
        )
        while job["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.05)
            job = a.get(f"/v1/jobs/{job['id']}")
        return _report(job, b)
    finally:
        for h in hosts:
            h.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _report(job: dict[str, Any], dest: HostClient) -> dict[str, Any]:
    stats = job.get("stats", {})
    verification = stats.get("verification", {})
    dest_vm: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        dest_vm = dest.get("/v1/vms/demo-vm")
    ram = stats.get("ram", {})
    return {
        "status": job["status"],
        "error": job.get("error", ""),
        "step": job.get("step", ""),
        "verified": bool(verification.get("verified")) and dest_vm.get("runstate") == "running",
        "verification": verification,
        "destination_runstate": dest_vm.get("runstate"),
        "downtime_ms": stats.get("downtime", 0.0),
        "downtime_breakdown": stats.get("downtime-breakdown", {}),
        "total_time_ms": stats.get("total-time", 0.0),
        "setup_time_ms": stats.get("setup-time", 0.0),
        "iterations": len(stats.get("passes", [])),
        "passes": stats.get("passes", []),
        "ram": {
            k: ram.get(k, 0)
            for k in (
                "transferred",
                "total",
                "duplicate",
                "normal",
                "normal-bytes",
                "remaining",
                "mbps",
                "dirty-sync-count",
                "pages-per-second",
            )
        },
        "throttle_pct": stats.get("cpu-throttle-percentage", 0),
    }
