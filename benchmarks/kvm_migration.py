"""Live migration of a real 2 GiB x86-64 KVM guest: vmferry against QEMU 7.2.

In one run, alternating, ``--rounds`` times each:

* vmferry: a 2 GiB ``arch = "x86_64"`` guest with random RAM, migrated between two host
  daemons on 127.0.0.1 -- idle, and dirtying at ``--dirty-rate-mbps`` (the rate a guest
  sustains here: each first write to a write-protected page costs tens of microseconds);
* QEMU (Debian's ``qemu-system-x86``, installed with apt-get if missing, ``-accel kvm``):
  2 GiB of random guest RAM (a memory-backend-file on tmpfs, prefilled, as the source;
  plain anonymous RAM on the destination), ``max-bandwidth`` unlimited, single stream and
  multifd with 4 channels;
* vmferry idle and dirtying with RAM over N parallel data channels (``--parallel
  0,1,2,4``: ``vmferry_idle_pN``, ``vmferry_dirtying_pN``; 0 is RAM in the main
  connection); ``vmferry_idle`` and ``vmferry_dirtying`` use the host's default.

Every vmferry run reports the downtime it predicted at the stop decision beside the
actual one (``prediction_error_pct``), and the downtime's parts as measured.

Prints one JSON object: per configuration the median total time, downtime and throughput
(bytes of guest RAM over total time), the raw runs, and the ratios against the better QEMU
configuration (target: throughput >= 1.5x, downtime <= QEMU's).

    PYTHONPATH=src python benchmarks/kvm_migration.py [--rounds 3] [--memory-mib 2048]
        [--parallel 0,1,2] [--only vmferry_idle,qemu_multifd4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from jobstats import final_pass

from vmferry.host.processes import spawn_host
from vmferry.hw.x86.kvm import kvm_usable

MIB = 1024 * 1024
QEMU = "qemu-system-x86_64"


# --- vmferry -------------------------------------------------------------------------------


class HostPair:
    """The two host daemons every vmferry run of a benchmark migrates between, started
    once and kept (long-running hosts, as in production: what one migration measured to
    a destination -- its switchover's fixed costs, device rates -- serves the next; a
    fresh pair per run made every run a first migration).  Each run's VM is removed from
    the destination after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pair: tuple[Any, Any] | None = None

    def get(self) -> tuple[Any, Any]:
        if self.pair is None:
            self.pair = (spawn_host("A", self.root / "A"), spawn_host("B", self.root / "B"))
        return self.pair

    def stop(self) -> None:
        if self.pair is not None:
            for host in self.pair:
                host.stop()
            self.pair = None


def vmferry_run(hosts: HostPair, memory_mib: int, rate: float,
                parallel: int | None = None) -> dict[str, Any]:  # fmt: skip
    a, b = hosts.get()
    try:
        ca, cb = a.client(timeout=120), b.client()
        definition = {"name": "bench", "arch": "x86_64", "memory_mib": memory_mib,
                      "vcpus": 1, "fill": "random",
                      "workload": {"dirty_rate_mbps": rate, "pattern": "uniform"}}
        ca.post("/v1/vms", {"definition": definition, "start": True})
        time.sleep(1.0)
        before = ca.get("/v1/vms/bench")["guest"]["progress"]
        params: dict[str, Any] = {"downtime_limit_ms": 300}
        if parallel is not None:
            params["parallel"] = parallel
        job = ca.post("/v1/vms/bench/migrate", {"destination": b.control_url,
                                                "params": params})
        while job["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.05)
            job = ca.get(f"/v1/jobs/{job['id']}")
        if job["status"] != "completed":
            raise RuntimeError(f"vmferry migration {job['status']}: {job.get('error')}")
        st = job["stats"]
        after = cb.get("/v1/vms/bench")["guest"]["progress"]
        total_s = st["total-time"] / 1e3
        return {"total_ms": st["total-time"], "downtime_ms": st["downtime"],
                "passes": len(st["passes"]), "bytes": st["ram"]["transferred"],
                "parallel": job.get("progress", {}).get("parallel", 0),
                "predicted_downtime_ms": st.get("predicted-downtime"),
                "prediction_error_pct": st.get("downtime-prediction-error-pct"),
                "downtime_breakdown": st.get("downtime-breakdown"),
                "predicted_breakdown": st.get("predicted-downtime-breakdown"),
                "prediction_inputs": st.get("prediction-inputs", {}),
                "switchover_parts": st.get("switchover-parts", {}),
                **final_pass(st), "load_average": [round(x, 2) for x in os.getloadavg()],
                "ram_gbps": memory_mib * MIB / total_s / 1e9,
                "guest_progress": [before, st["source_report"]["x86-cpu"]["progress_at_stop"],
                                   after]}
    except BaseException:
        hosts.stop()  # a failed run leaves no VM behind on the next
        raise
    finally:
        for host in (a, b):
            with contextlib.suppress(Exception):
                host.client().delete("/v1/vms/bench")


# --- QEMU ----------------------------------------------------------------------------------


def ensure_qemu() -> str:
    if shutil.which(QEMU) is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "qemu-system-x86"], check=True,
                       env=env, stdout=subprocess.DEVNULL)
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


class Qmp:
    """A minimal QMP client over a Unix socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefill(path: Path, size: int) -> None:
    rng = np.random.default_rng(7)
    block = rng.integers(0, 2**63, size=16 * MIB // 8, dtype=np.uint64)
    with path.open("wb") as f:
        for k in range(size // (16 * MIB)):
            f.write((block ^ np.uint64(k * 0x9E3779B97F4A7C15 & (2**64 - 1))).tobytes())


def qemu_run(root: Path, memory_mib: int, multifd: int, tag: str) -> dict[str, Any]:
    size = memory_mib * MIB
    backing = Path("/dev/shm") / f"vmferry-bench-{os.getpid()}-{tag}"
    prefill(backing, size)
    common = [QEMU, "-accel", "kvm", "-m", f"{memory_mib}M", "-display", "none",
              "-nodefaults", "-no-user-config", "-serial", "none"]
    port = free_port()
    src_sock, dst_sock = root / f"src-{tag}.qmp", root / f"dst-{tag}.qmp"
    src = subprocess.Popen(
        [*common, "-object", f"memory-backend-file,id=m0,size={memory_mib}M,"
         f"mem-path={backing},share=on", "-machine", "pc,memory-backend=m0",
         "-qmp", f"unix:{src_sock},server=on,wait=off"], stderr=subprocess.DEVNULL)
    dst = subprocess.Popen(
        [*common, "-object", f"memory-backend-ram,id=m0,size={memory_mib}M",
         "-machine", "pc,memory-backend=m0", "-incoming", "defer",
         "-qmp", f"unix:{dst_sock},server=on,wait=off"], stderr=subprocess.DEVNULL)
    qs = qd = None
    try:
        qs, qd = Qmp(src_sock), Qmp(dst_sock)
        for q in (qs, qd):
            if multifd:
                q.cmd("migrate-set-capabilities",
                      capabilities=[{"capability": "multifd", "state": True}])
                q.cmd("migrate-set-parameters", **{"multifd-channels": multifd})
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40,
                                             "downtime-limit": 300})
        qd.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        time.sleep(0.5)  # the guest (firmware, then idle) runs
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = qs.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU migration {info['status']}: {info.get('error-desc')}")
        total_s = info["total-time"] / 1e3
        return {"total_ms": info["total-time"], "downtime_ms": info["downtime"],
                "bytes": info["ram"]["transferred"],
                "passes": info["ram"].get("dirty-sync-count", 0),
                "ram_gbps": size / total_s / 1e9}
    finally:
        for q in (qs, qd):
            if q is not None:
                q.close()
        for p in (src, dst):
            p.kill()
            p.wait()
        backing.unlink(missing_ok=True)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {
        "median_total_ms": round(statistics.median(r["total_ms"] for r in runs), 1),
        "median_downtime_ms": round(statistics.median(r["downtime_ms"] for r in runs), 2),
        "median_ram_gbps": round(statistics.median(r["ram_gbps"] for r in runs), 3),
    }
    predicted = [r["predicted_downtime_ms"] for r in runs if r.get("predicted_downtime_ms")]
    if predicted:
        out["median_predicted_downtime_ms"] = round(statistics.median(predicted), 2)
        errors = [r["prediction_error_pct"] for r in runs
                  if r.get("prediction_error_pct") is not None]  # fmt: skip
        if errors:
            out["median_prediction_error_pct"] = round(statistics.median(errors), 1)
    return {**out, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-mib", type=int, default=2048)
    parser.add_argument("--dirty-rate-mbps", type=float, default=40.0,
                        help="the dirtying guest's rate (what a guest sustains here)")
    parser.add_argument("--skip-qemu", action="store_true")
    parser.add_argument("--parallel", default="0,1,2,4",
                        help="data channel counts of the vmferry_{idle,dirtying}_pN "
                        "configurations")
    parser.add_argument("--only", default="",
                        help="comma-separated configurations to run (default: all)")
    args = parser.parse_args()
    usable, why = kvm_usable()
    if not usable:
        print(json.dumps({"skipped": f"KVM not usable: {why}"}))
        return
    qemu_version = None if args.skip_qemu else ensure_qemu()
    root = Path(tempfile.mkdtemp(prefix="vmferry-kvm-bench-"))
    configs: dict[str, list[dict[str, Any]]] = {"vmferry_idle": [], "vmferry_dirtying": []}
    counts = [int(p) for p in args.parallel.split(",") if p.strip()]
    configs |= {f"vmferry_idle_p{p}": [] for p in counts}
    configs |= {f"vmferry_dirtying_p{p}": [] for p in counts}
    if not args.skip_qemu:
        configs |= {"qemu_single": [], "qemu_multifd4": []}
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    hosts = HostPair(root)
    try:
        for rnd in range(args.rounds):
            for name, runs in configs.items():
                tag = f"{name}-{rnd}"
                if name == "vmferry_idle":
                    runs.append(vmferry_run(hosts, args.memory_mib, 0.0))
                elif name.startswith("vmferry_idle_p"):
                    runs.append(vmferry_run(hosts, args.memory_mib, 0.0,
                                            int(name.removeprefix("vmferry_idle_p"))))
                elif name == "vmferry_dirtying":
                    runs.append(vmferry_run(hosts, args.memory_mib, args.dirty_rate_mbps))
                elif name.startswith("vmferry_dirtying_p"):
                    runs.append(vmferry_run(hosts, args.memory_mib, args.dirty_rate_mbps,
                                            int(name.removeprefix("vmferry_dirtying_p"))))
                else:
                    runs.append(qemu_run(root, args.memory_mib,
                                         4 if name == "qemu_multifd4" else 0, tag))
                print(f"{tag}: {json.dumps(runs[-1])}", file=sys.stderr)
    finally:
        hosts.stop()
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"memory_mib": args.memory_mib, "rounds": args.rounds,
                           "qemu": qemu_version, "dirty_rate_mbps": args.dirty_rate_mbps,
                           "load_average": os.getloadavg(),
                           "configs": {k: summary(v) for k, v in configs.items()}}
    c = out["configs"]
    errors = {k: v["median_prediction_error_pct"] for k, v in c.items()
              if "median_prediction_error_pct" in v}  # fmt: skip
    if errors:
        out["prediction_error_pct"] = errors
        out["prediction_within_15pct"] = all(abs(e) <= 15 for e in errors.values())
    if {"qemu_single", "qemu_multifd4"} <= set(configs):
        best = max(("qemu_single", "qemu_multifd4"), key=lambda k: c[k]["median_ram_gbps"])
        out["best_qemu"] = best
        for ours in [k for k in c if k.startswith("vmferry_")]:
            out[f"{ours}_throughput_ratio"] = round(
                c[ours]["median_ram_gbps"] / c[best]["median_ram_gbps"], 3)
            out[f"{ours}_downtime_ratio"] = round(
                c[ours]["median_downtime_ms"] / max(c[best]["median_downtime_ms"], 1e-9), 3)
        out["target"] = "throughput ratio >= 1.5, downtime ratio <= 1.0"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
