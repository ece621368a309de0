"""VFIO device state through a live migration between two host daemons, against RAM.

Prints one JSON object.  Two host processes (A, B) on 127.0.0.1; each round migrates,
interleaved so machine load hits both alike:

* ``ram``: an idle VM with ``--ram-mib`` of incompressible RAM and no device; its
  throughput is RAM bytes over the migration's total time (setup, the pass, switchover,
  the destination's load and acknowledgement);
* ``device``: a VM with 16 MiB of untouched RAM and one pds-like device holding
  ``--device-mib`` of STOP_COPY state; its throughput is device bytes over the
  migration's total time, measured the same way: setup (the destination builds the
  device and allocates its restore buffer), the device's STOP_COPY read, the stream, the
  destination's writes into the resuming device and its validation (RESUMING -> STOP),
  and the acknowledgement.  The downtime is reported too: nearly all of it is the
  device's state, since it can only move once the device stopped.

Both migrations are verified (digests equal at switchover; verification time is not
counted).  The device's state dominates the expected downtime, so both run with a large
downtime limit and switch over after one pass.

    PYTHONPATH=src python benchmarks/vfio_migration_throughput.py [--device-mib 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from vmferry.host.client import HostClient
from vmferry.host.processes import spawn_host

MIB = 1024 * 1024
PARAMS = {"verify": True, "downtime_limit_ms": 600_000}


def _migrate(a: HostClient, b_url: str, name: str) -> dict[str, Any]:
    job = a.post(f"/v1/vms/{name}/migrate", {"destination": b_url, "params": PARAMS})
    deadline = time.monotonic() + 600
    while job["status"] not in ("completed", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"migration of {name} did not finish")
        time.sleep(0.02)
        job = a.get(f"/v1/jobs/{job['id']}")
    if job["status"] != "completed":
        raise RuntimeError(f"migration of {name} {job['status']}: {job.get('error')}")
    stats: dict[str, Any] = job["stats"]
    return stats


def ram_round(a: HostClient, b: HostClient, b_url: str, n: int, mib: int) -> dict[str, Any]:
    name = f"ram-{n}"
    a.post("/v1/vms", {"definition": {"name": name, "memory_mib": mib, "fill": "random",
                                      "workload": {"dirty_rate_mbps": 0}}, "start": True})  # fmt: skip
    stats = _migrate(a, b_url, name)
    b.delete(f"/v1/vms/{name}")
    seconds = stats["total-time"] / 1e3
    return {"bytes": stats["ram"]["normal-bytes"], "seconds": seconds,
            "verified": stats["verification"]["verified"]}  # fmt: skip


def device_round(a: HostClient, b: HostClient, b_url: str, n: int, mib: int) -> dict[str, Any]:
    name = f"dev-{n}"
    device = {"id": "big0", "driver": "pds", "state_mib": mib, "dma_region": [MIB, 65536],
              "seed": n}  # fmt: skip
    a.post("/v1/vms", {"definition": {"name": name, "memory_mib": 16, "fill": "zero",
                                      "workload": {"dirty_rate_mbps": 0},
                                      "devices": [device]}, "start": True})  # fmt: skip
    stats = _migrate(a, b_url, name)
    b.delete(f"/v1/vms/{name}")
    breakdown = stats["downtime-breakdown"]
    seconds = stats["total-time"] / 1e3
    verification = stats["verification"]
    return {
        "bytes": stats["device-bytes"],
        "seconds": seconds,
        "downtime_ms": breakdown["total_ms"],
        "verified": verification["verified"]
        and verification["source"]["handler:vfio"] == verification["destination"]["handler:vfio"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-mib", type=int, default=256)
    parser.add_argument("--ram-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    hosts = []
    try:
        hosts = [spawn_host("A", workdir / "A"), spawn_host("B", workdir / "B")]
        a, b = (HostClient(h.control_url, timeout=600) for h in hosts)
        ram, dev = [], []
        for n in range(args.repeat):
            ram.append(ram_round(a, b, hosts[1].control_url, n, args.ram_mib))
            dev.append(device_round(a, b, hosts[1].control_url, n, args.device_mib))
    finally:
        for h in hosts:
            h.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def rate(r: dict[str, Any]) -> float:
        return float(r["bytes"] / r["seconds"] / 1e6)

    ram_best, dev_best = max(map(rate, ram)), max(map(rate, dev))
    ram_med, dev_med = statistics.median(map(rate, ram)), statistics.median(map(rate, dev))
    print(json.dumps({
        "device_state_bytes": dev[0]["bytes"],
        "ram_bytes": ram[0]["bytes"],
        "rounds": args.repeat,
        "verified": all(r["verified"] for r in ram + dev),
        "ram_MBps_best": round(ram_best, 1),
        "device_MBps_best": round(dev_best, 1),
        "ram_MBps_median": round(ram_med, 1),
        "device_MBps_median": round(dev_med, 1),
        "device_vs_ram_best": round(dev_best / ram_best, 3),
        "device_vs_ram_median": round(dev_med / ram_med, 3),
        "device_downtime_ms": [round(r["downtime_ms"], 1) for r in dev],
        "target": 0.7,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
