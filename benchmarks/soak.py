"""Soak: many verified live migrations of dirtying guests, back and forth; 0 mismatches.

Each pattern (``uniform``, ``hot``, ``sequential``) has one guest that keeps dirtying its
RAM in a real guest thread (:class:`vmferry.host.runner.VmRunner`) while it migrates from
one side to the other and back, again and again.  Every migration verifies: the
destination's RAM, vCPU and handler digests are compared with the source's before COMMIT
(a mismatch fails that migration and the source resumes), so a lost dirty page shows up
here as a mismatch.

Transports:

* ``local`` (default): both sides in this process, the stream handed straight from the
  source session to the destination session (no sockets) while the guest thread runs
  concurrently with the sender -- the concurrency that lost dirty marks;
* ``daemons``: two real host daemons on 127.0.0.1 and the whole control path.

Prints one JSON object: migrations, mismatches, failures, per-pattern counts, time, and
the downtime figures (median and max, verification not counted, and the verification
cost separately).

    python benchmarks/soak.py [--migrations 102] [--memory-mib 16] [--dirty-rate-mbps 40]
                              [--transport local|daemons]
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

from vmferry.errors import MigrationError
from vmferry.guest.workload import PATTERNS
from vmferry.host.clocks import MonotonicClock
from vmferry.host.runner import VmRunner
from vmferry.machine.vm import VM, create_vm
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import StreamDecoder

#: a paced link (128 MiB/s) and a tight downtime limit, so pre-copy needs several passes
#: and the guest dirties pages while every one of them is sent
PARAMS = {"verify": True, "downtime_limit_ms": 20.0, "max_bandwidth_mib": 128.0,
          "max_passes": 8}


def definition(pattern: str, memory_mib: int, rate: float) -> dict[str, Any]:
    return {
        "name": f"soak-{pattern}",
        "memory_mib": memory_mib,
        "vcpus": 2,
        "fill": "random",
        "workload": {"dirty_rate_mbps": rate, "pattern": pattern, "seed": 7},
    }


# --- in process ----------------------------------------------------------------------


class Side:
    """A VM with its guest thread, on one side of the link."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.runner = VmRunner(vm)
        self.runner.resume()

    def close(self) -> None:
        self.runner.stop()
        self.vm.close()


def migrate_once(side: Side) -> tuple[Side, dict[str, Any]]:
    """One verified live migration of ``side``'s guest; returns the side the guest now
    runs on and a result row.  On a mismatch the source resumes (as the host does)."""
    params = MigrationParams(**PARAMS)  # type: ignore[arg-type]
    clock = MonotonicClock()
    src = SourceSession(side.vm, params, clock, guest=side.runner)
    dst = DestinationSession(clock, verify=True)
    decoder = StreamDecoder()
    bufs = src.start()
    while bufs:  # the guest thread keeps running (and dirtying) until switchover
        time.sleep(src.pacing_delay())
        for b in bufs:
            decoder.feed(b)
        for rec in decoder.events():
            dst.receive(rec)
        bufs = src.next_buffers()
    decoder.eof()
    src.switchover_digests()
    ack = dst.finish(start=False)  # LOADED
    report = src.verification(ack)
    if not report["commit_allowed"]:
        dst.abort()
        src.fail("verification", f"digests differ in {report['differ']}")
        return side, {"ok": False, "differ": report["differ"]}
    dst.resume(run=False)  # COMMIT
    moved = Side(dst.hand_over())  # RESUMED: the guest runs on the other side
    stats = src.complete(ack)
    side.close()
    return moved, {
        "ok": True,
        "passes": len(stats.passes),
        "downtime_ms": stats.downtime.total_ms,
        "verification_ms": stats.downtime.verification_ms + src.source_digest_ms,
    }


def soak_local(migrations: int, memory_mib: int, rate: float) -> list[dict[str, Any]]:
    sides = {p: Side(create_vm(definition(p, memory_mib, rate))) for p in PATTERNS}
    rows: list[dict[str, Any]] = []
    try:
        for i in range(migrations):
            pattern = PATTERNS[i % len(PATTERNS)]
            time.sleep(0.02)  # let the guest dirty some pages between migrations
            sides[pattern], row = migrate_once(sides[pattern])
            rows.append({"pattern": pattern, **row})
    finally:
        for side in sides.values():
            side.close()
    return rows


# --- two daemons ---------------------------------------------------------------------


def soak_daemons(migrations: int, memory_mib: int, rate: float) -> list[dict[str, Any]]:
    from vmferry.host.processes import spawn_host

    root = Path(tempfile.mkdtemp(prefix="vmferry-soak-"))
    procs = [spawn_host("A", root / "A"), spawn_host("B", root / "B")]
    clients = [p.client() for p in procs]
    where = dict.fromkeys(PATTERNS, 0)
    rows: list[dict[str, Any]] = []
    try:
        for p in PATTERNS:
            clients[0].post("/v1/vms", {"definition": definition(p, memory_mib, rate),
                                        "start": True})
        for i in range(migrations):
            pattern = PATTERNS[i % len(PATTERNS)]
            a = where[pattern]
            b = 1 - a
            job = clients[a].post(
                f"/v1/vms/soak-{pattern}/migrate",
                {"destination": procs[b].control_url, "params": PARAMS},
            )
            job = _wait(clients[a], job["id"])
            v = job["stats"].get("verification", {})
            ok = job["status"] == "completed" and bool(v.get("verified"))
            row: dict[str, Any] = {"pattern": pattern, "ok": ok}
            if ok:
                clients[a].delete(f"/v1/vms/soak-{pattern}")  # the migrated husk
                where[pattern] = b
                bd = job["stats"]["downtime-breakdown"]
                row |= {"passes": len(job["stats"]["passes"]), "downtime_ms": bd["total_ms"],
                        "verification_ms": bd["verification_ms"]}
            else:
                row |= {"status": job["status"], "error": job["error"],
                        "differ": v.get("differ")}
            rows.append(row)
    finally:
        for proc in procs:
            proc.stop()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def _wait(client: Any, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}")
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise MigrationError(f"job {job_id} did not finish in {timeout} s", "soak")


# --- report --------------------------------------------------------------------------


def soak(migrations: int, memory_mib: int = 16, rate: float = 40.0,
         transport: str = "local") -> dict[str, Any]:
    t0 = time.monotonic()
    run = soak_local if transport == "local" else soak_daemons
    rows = run(migrations, memory_mib, rate)
    seconds = time.monotonic() - t0
    done = [r for r in rows if r["ok"]]
    downtimes = [r["downtime_ms"] for r in done]
    verify = [r["verification_ms"] for r in done]
    return {
        "transport": transport,
        "memory_mib": memory_mib,
        "dirty_rate_mbps": rate,
        "migrations": len(rows),
        "completed": len(done),
        "mismatches": sum(1 for r in rows if r.get("differ")),
        "failures": [r for r in rows if not r["ok"]],
        "per_pattern": {p: sum(1 for r in done if r["pattern"] == p) for p in PATTERNS},
        "passes_max": max((r["passes"] for r in done), default=0),
        "passes_mean": round(statistics.mean(r["passes"] for r in done), 2) if done else None,
        "downtime_ms_median": round(statistics.median(downtimes), 2) if downtimes else None,
        "downtime_ms_max": round(max(downtimes), 2) if downtimes else None,
        "verification_ms_median": round(statistics.median(verify), 2) if verify else None,
        "seconds": round(seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--migrations", type=int, default=102)
    ap.add_argument("--memory-mib", type=int, default=16)
    ap.add_argument("--dirty-rate-mbps", type=float, default=40.0)
    ap.add_argument("--transport", choices=("local", "daemons"), default="local")
    a = ap.parse_args()
    print(json.dumps(soak(a.migrations, a.memory_mib, a.dirty_rate_mbps, a.transport),
                     indent=2))


if __name__ == "__main__":
    main()
