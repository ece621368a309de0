"""What verification costs in downtime: the same migration with and without ``verify``.

With ``verify`` the destination takes digests of RAM, vCPUs and handler state after it
loads and sends them with LOADED; the source (which took its own right after END, while
the destination loads) compares them *before* COMMIT.  The guest therefore stays paused
for the destination's digest time plus whatever the source's digest outlasts the load.

For each guest size, idle guests of random RAM migrate between two host daemons, ``runs``
times with and without verification.  The guest's real pause is the reported downtime
(which leaves verification out) plus ``verification_ms``.  Prints one JSON object with
medians and the cost (paused with verify minus paused without, and its ratio).

    python benchmarks/verify_cost.py [--sizes 256,1024] [--runs 3]
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


def _wait(client: HostClient, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}")
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.02)


def measure(sizes: list[int], runs: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="vmferry-verify-"))
    procs = [spawn_host("A", root / "A"), spawn_host("B", root / "B")]
    clients = [p.client() for p in procs]
    out: dict[str, Any] = {}
    try:
        for mib in sizes:
            name = f"v{mib}"
            clients[0].post("/v1/vms", {"definition": {"name": name, "memory_mib": mib,
                                                       "vcpus": 2, "fill": "random"},
                                        "start": True})
            here = 0
            paused: dict[bool, list[float]] = {True: [], False: []}
            verify_ms: list[float] = []
            for _ in range(runs):
                for verify in (False, True):
                    job = clients[here].post(
                        f"/v1/vms/{name}/migrate",
                        {"destination": procs[1 - here].control_url,
                         "params": {"verify": verify, "downtime_limit_ms": 1000}},
                    )
                    job = _wait(clients[here], job["id"])
                    assert job["status"] == "completed", job
                    bd = job["stats"]["downtime-breakdown"]
                    paused[verify].append(bd["total_ms"] + bd["verification_ms"])
                    if verify:
                        verify_ms.append(bd["verification_ms"])
                    clients[here].delete(f"/v1/vms/{name}")
                    here = 1 - here
            without = statistics.median(paused[False])
            with_ = statistics.median(paused[True])
            out[f"{mib}MiB"] = {
                "paused_ms_without_verify": round(without, 1),
                "paused_ms_with_verify": round(with_, 1),
                "destination_digest_ms": round(statistics.median(verify_ms), 1),
                "cost_ms": round(with_ - without, 1),
                "ratio": round(with_ / without, 2) if without else None,
            }
            clients[here].delete(f"/v1/vms/{name}")
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    print(json.dumps(measure(sizes, a.runs), indent=2))


if __name__ == "__main__":
    main()
