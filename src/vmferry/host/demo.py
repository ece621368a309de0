"""The demo: two host daemons on 127.0.0.1, live migrations, proven.

The main VM carries two VFIO devices configured with P2P (an mlx5-like NIC with pre-copy
and a pds-like device); a second, small VM carries a hisi_acc-like accelerator alone,
because a device without P2P may only migrate as a VM's single device (QEMU's
multi-device rule).  Both migrations are verified: RAM, vCPU and every device's state
equal at switchover, and every device RUNNING on the destination.
"""

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
from vmferry.hw.x86.kvm import kvm_usable


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
    #: VFIO devices: mlx5 + pds on the main VM, a second VM with hisi_acc alone
    devices: bool = True
    #: "auto": a real x86-64 guest on KVM where /dev/kvm is usable, else the simulated
    #: guest; "kvm" or "model" to insist
    backend: str = "auto"


def choose_backend(wanted: str) -> tuple[str, str]:
    """(backend, note): ``kvm`` where KVM is usable (or wanted), else ``model``."""
    if wanted == "model":
        return "model", "simulated guest (as asked)"
    usable, why = kvm_usable()
    if usable or wanted == "kvm":
        return "kvm", f"real x86_64 guest on KVM ({why})"
    return "model", f"KVM not usable here ({why}): using the simulated guest"


MIB = 1024 * 1024
#: the main VM's devices: both with P2P, so they may migrate together
MAIN_DEVICES: list[dict[str, Any]] = [
    {"id": "nic0", "driver": "mlx5", "state_mib": 4, "dma_region": [MIB, 64 * 1024], "seed": 1},
    {"id": "disk0", "driver": "pds", "p2p": True, "dma_region": [2 * MIB, 64 * 1024], "seed": 2},
]
#: the second VM: a device without P2P, alone
ACC_VM: dict[str, Any] = {
    "name": "demo-acc",
    "arch": "generic",
    "memory_mib": 64,
    "vcpus": 1,
    "fill": "mixed",
    "workload": {"dirty_rate_mbps": 5.0, "pattern": "hot"},
    "devices": [{"id": "acc0", "driver": "hisi_acc", "dma_region": [MIB, 4096], "seed": 3}],
}


def run_demo(opts: DemoOptions, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the whole demo; returns the report.  Daemons are stopped on every exit path."""
    workdir = Path(tempfile.mkdtemp(prefix="vmferry-demo-"))
    hosts: list[HostProcess] = []
    try:
        say("starting host daemons A and B on 127.0.0.1")
        # the stream copy goes where it was asked for: A's images directory is there
        images = (["--images-dir", str(Path(opts.stream_file).resolve().parent)]
                  if opts.stream_file else [])
        hosts.append(spawn_host("A", workdir / "A", extra_args=images))
        hosts.append(spawn_host("B", workdir / "B"))
        a, b = (h.client() for h in hosts)
        backend, note = choose_backend(opts.backend)
        say(note)
        definition = {
            "name": "demo-vm",
            "arch": "x86_64" if backend == "kvm" else "generic",
            "memory_mib": opts.memory_mib,
            "vcpus": opts.vcpus,
            "fill": opts.fill,
            "workload": {"dirty_rate_mbps": opts.dirty_rate_mbps, "pattern": opts.pattern},
            **({"devices": MAIN_DEVICES} if opts.devices else {}),
            **opts.extra_definition,
        }
        say(
            f"creating demo-vm on A: {opts.memory_mib} MiB, {opts.vcpus} vCPUs, "
            f"fill={opts.fill}, dirtying {opts.dirty_rate_mbps:g} MB/s"
            + (", VFIO devices nic0 (mlx5) and disk0 (pds), both with P2P" if opts.devices else "")
        )
        a.post("/v1/vms", {"definition": definition, "start": True})
        if opts.devices:
            say("creating demo-acc on A: 64 MiB, VFIO device acc0 (hisi_acc, no P2P: alone)")
            a.post("/v1/vms", {"definition": ACC_VM, "start": True})
        time.sleep(opts.warmup_s)
        params: dict[str, Any] = {"downtime_limit_ms": opts.downtime_limit_ms, "verify": True}
        if opts.stream_file:
            params["stream_file"] = str(Path(opts.stream_file).resolve())
        say(f"live-migrating demo-vm A -> B (downtime limit {opts.downtime_limit_ms:g} ms)")
        report = _report(_migrate(a, "demo-vm", hosts[1].control_url, params), b)
        report["backend"], report["backend_note"] = backend, note
        if backend == "kvm":
            report["guest_progress"] = _guest_progress(report, b)
            report["verified"] = report["verified"] and report["guest_progress"]["continued"]
        if opts.devices:
            say("live-migrating demo-acc A -> B")
            params = {"downtime_limit_ms": opts.downtime_limit_ms, "verify": True}
            acc = _report(_migrate(a, "demo-acc", hosts[1].control_url, params), b, "demo-acc")
            report["vms"] = {"demo-acc": {k: acc[k] for k in _SUMMARY}}
            report["verified"] = report["verified"] and acc["verified"]
        return report
    finally:
        for h in hosts:
            h.stop()
        shutil.rmtree(workdir, ignore_errors=True)


_SUMMARY = ("status", "error", "verified", "downtime", "total-time", "iterations",
            "devices", "warnings")  # fmt: skip


def _guest_progress(report: dict[str, Any], dest: HostClient) -> dict[str, Any]:
    """The real guest's progress counter when the source stopped it and on the destination
    after the resume (waiting up to 5 s for it to move on)."""
    before = report.get("source_report", {}).get("x86-cpu", {}).get("progress_at_stop")
    after = None
    end = time.monotonic() + 5.0
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            after = dest.get("/v1/vms/demo-vm")["guest"]["progress"]
        if before is not None and after is not None and after > before:
            break
        time.sleep(0.05)
    return {"before_stop": before, "after_resume": after,
            "continued": before is not None and after is not None and after > before}


def _migrate(a: HostClient, name: str, destination: str, params: dict[str, Any]) -> Any:
    job = a.post(f"/v1/vms/{name}/migrate", {"destination": destination, "params": params})
    while job["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(0.05)
        job = a.get(f"/v1/jobs/{job['id']}")
    return job


def _split_digest(text: str | None) -> dict[str, str]:
    """The VFIO handler's ``id:digest;id:digest`` as a mapping."""
    return dict(p.split(":", 1) for p in (text or "").split(";") if ":" in p)


def _devices(verification: dict[str, Any], dest_vm: dict[str, Any]) -> dict[str, Any]:
    """Per device: digests at switchover on both sides, and its state on the destination."""
    src = _split_digest(verification.get("source", {}).get("handler:vfio"))
    dst = _split_digest(verification.get("destination", {}).get("handler:vfio"))
    running = dest_vm.get("report", {}).get("vfio", {}).get("devices", {})
    return {
        ident: {
            "driver": running.get(ident, {}).get("driver"),
            "source_digest": digest,
            "destination_digest": dst.get(ident),
            "equal": dst.get(ident) == digest,
            "destination_state": running.get(ident, {}).get("state"),
        }
        for ident, digest in src.items()
    }


def _report(job: dict[str, Any], dest: HostClient, name: str = "demo-vm") -> dict[str, Any]:
    stats = job.get("stats", {})
    verification = stats.get("verification", {})
    dest_vm: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        dest_vm = dest.get(f"/v1/vms/{name}")
    ram = stats.get("ram", {})
    devices = _devices(verification, dest_vm)
    devices_ok = all(d["equal"] and d["destination_state"] == "RUNNING" for d in devices.values())
    return {
        "status": job["status"],
        "error": job.get("error", ""),
        "step": job.get("step", ""),
        "verified": bool(verification.get("verified")) and dest_vm.get("runstate") == "running"
        and devices_ok,
        "verification": verification,
        "devices": devices,
        "device_bytes": stats.get("device-bytes", 0),
        "destination_runstate": dest_vm.get("runstate"),
        # the job's names and units (QMP's): times in ms
        "downtime": stats.get("downtime", 0.0),
        "downtime-breakdown": stats.get("downtime-breakdown", {}),
        "total-time": stats.get("total-time", 0.0),
        "setup-time": stats.get("setup-time", 0.0),
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
        "cpu-throttle-percentage": stats.get("cpu-throttle-percentage", 0),
        "warnings": stats.get("warnings", []),
        "source_report": stats.get("source_report", {}),
    }
