"""Live-migration throughput between two host daemons, against the raw loopback baseline.

Prints one JSON object.  Cases (each a real migration between two host processes):

* ``idle_random``: an idle VM of incompressible RAM (default 2 GiB);
* ``dirty_50``: a VM whose workload dirties 50 MB/s (hot set), default 2 GiB;
* ``zero_4g``: a 4 GiB VM that never touched its memory;
* ``tls_idle_random``: ``idle_random`` between two hosts serving mutual TLS
  (``host serve --tls-dir``), with its ratio to the plaintext run of the same process.

``--tls-only`` runs just the two idle cases (plaintext and TLS).

Baseline, measured in the same run: a child process sends the same volume over a
loopback TCP socket to another that ``recv_into``s it into a freshly mapped anonymous
region (MADV_HUGEPAGE) -- the most a fresh destination can take on this machine.

    python benchmarks/migration_throughput.py [--memory-mib 2048] [--quick]
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from vmferry.host.client import HostClient
from vmferry.host.processes import spawn_host
from vmferry.host.tls import make_certs

MIB = 1024 * 1024


def _receiver(port_q: Any, size: int, result_q: Any) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(region)
    t0 = time.perf_counter()
    got = 0
    while got < size:
        n = conn.recv_into(view[got : got + 4 * MIB])
        if n == 0:
            break
        got += n
    result_q.put((got, time.perf_counter() - t0))


def _sender(port: int, size: int) -> None:
    src = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    chunk = bytes(range(256)) * (4 * MIB // 256)
    for off in range(0, size, len(chunk)):
        src[off : off + len(chunk)] = chunk[: size - off]
    sock = socket.create_connection(("127.0.0.1", port))
    view = memoryview(src)
    for off in range(0, size, 4 * MIB):
        sock.sendall(view[off : off + 4 * MIB])
    sock.close()


def baseline(size: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    recv = ctx.Process(target=_receiver, args=(port_q, size, result_q))
    recv.start()
    send = ctx.Process(target=_sender, args=(port_q.get(), size))
    send.start()
    got, seconds = result_q.get()
    send.join()
    recv.join()
    return {"bytes": got, "seconds": round(seconds, 3), "gb_per_s": round(got / seconds / 1e9, 3)}


def migrate_case(
    a: HostClient, b_url: str, name: str, definition: dict[str, Any], warmup: float
) -> dict[str, Any]:
    a.post("/v1/vms", {"definition": {"name": name, **definition}, "start": True})
    time.sleep(warmup)
    job = a.post(f"/v1/vms/{name}/migrate", {"destination": b_url, "params": {"verify": False}})
    while job["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(0.02)
        job = a.get(f"/v1/jobs/{job['id']}")
    st = job["stats"]
    total_s = st["total-time"] / 1e3
    size = definition["memory_mib"] * MIB
    return {
        "status": job["status"],
        "error": job.get("error", ""),
        "memory_bytes": size,
        "total_time_ms": round(st["total-time"], 1),
        "downtime_ms": round(st["downtime"], 1),
        "passes": len(st["passes"]),
        "transferred": st["ram"]["transferred"],
        "gb_per_s": round(size / total_s / 1e9, 3),
        "pass1_gb_per_s": round(st["passes"][0]["mbps"] / 8 / 1e3, 3) if st["passes"] else 0,
    }


def tls_case(work: Path, definition: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """The idle case between two TLS hosts, and its ratio to the plaintext run."""
    make_certs(work / "pki", ["C", "D"])
    hosts = [spawn_host("C", work / "C", tls_dir=work / "pki" / "C"),
             spawn_host("D", work / "D", tls_dir=work / "pki" / "D")]  # fmt: skip
    try:
        c: HostClient = hosts[0].client(timeout=120)
        out = migrate_case(c, hosts[1].control_url, "idle-tls", definition, 0.2)
    finally:
        for h in hosts:
            h.stop()
    out["ratio_to_plaintext"] = round(out["gb_per_s"] / plain["gb_per_s"], 3)
    out["pass1_ratio_to_plaintext"] = round(
        out["pass1_gb_per_s"] / plain["pass1_gb_per_s"], 3) if plain["pass1_gb_per_s"] else 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-mib", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="256 MiB cases (smoke run)")
    ap.add_argument("--tls-only", action="store_true", help="only idle: plaintext and TLS")
    args = ap.parse_args()
    mib = 256 if args.quick else args.memory_mib
    work = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    hosts = []
    try:
        hosts = [spawn_host("A", work / "A"), spawn_host("B", work / "B")]
        a = hosts[0].client(timeout=120)
        b_url = hosts[1].control_url
        idle_def = {"memory_mib": mib, "vcpus": 2, "fill": "random"}
        idle = migrate_case(a, b_url, "idle", idle_def, 0.2)
        tls = tls_case(work, idle_def, idle)
        if args.tls_only:
            print(json.dumps({"idle_random": idle, "tls_idle_random": tls}, indent=2))
            return
        base = baseline(mib * MIB)
        dirty = migrate_case(
            a,
            b_url,
            "dirty",
            {
                "memory_mib": mib,
                "vcpus": 2,
                "fill": "random",
                "workload": {"dirty_rate_mbps": 50, "pattern": "hot"},
            },
            1.0,
        )
        zero = migrate_case(
            a,
            b_url,
            "zero",
            {"memory_mib": 4 * mib if args.quick else 4096, "vcpus": 2, "fill": "zero"},
            0.1,
        )
        report = {
            "baseline_fresh_region": base,
            "idle_random": {
                **idle,
                "ratio_to_baseline": round(idle["gb_per_s"] / base["gb_per_s"], 3),
            },
            "tls_idle_random": tls,
            "dirty_50mbps": dirty,
            "zero": zero,
            "targets": {
                "idle_ratio>=0.8": idle["gb_per_s"] >= 0.8 * base["gb_per_s"],
                "dirty_downtime<=300ms": dirty["downtime_ms"] <= 300,
                "zero_4g<1s": zero["total_time_ms"] < 1000,
            },
        }
        print(json.dumps(report, indent=2))
    finally:
        for h in hosts:
            h.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
