"""Live migration on this machine: vmferry against QEMU 7.2, in one run, alternated.

Prints one JSON object with every figure, the medians and the ratios.  Cases:

* ``idle``: 2 GiB of random guest RAM, idle.  vmferry between two host daemons; QEMU
  (Debian's ``qemu-system-x86``, installed with apt-get if missing, ``-accel kvm``) with
  the source's RAM a prefilled tmpfs ``memory-backend-file`` (share=on), the
  destination's plain anonymous RAM, max-bandwidth unlimited, once single stream and once
  multifd with 4 channels.  Target: vmferry >= 2x the better QEMU configuration.
* ``dirty_50``: 2 GiB random, the guest dirtying 50 MB/s (hot set), migrated with a
  downtime limit of 50 ms.  Target: downtime <= 50 ms.
* ``device_64``: a VM with 64 MiB of device state, an mlx5-like VFIO device with
  pre-copy: its image moves before the stop and the destination loads it and acknowledges
  (switchover-ack) before the source stops the guest; only the dirty tail is stop-copy.
  Target: downtime < 100 ms by default.  ``device_64_stopcopy`` is the same 64 MiB on a
  pds-like device, which has no pre-copy (all of it moves in the stop): the baseline,
  measured in the same run, with the ratio of the two downtimes.  Both run with the
  host's default data channels (as ``idle``: no ``parallel`` parameter), and again with
  RAM and device state in the main connection (``_p0``) and over 4 channels (``_p4``).
  ``--device-only`` runs just these.
* ``zero_4g``: a 4 GiB VM that never touched its memory.  Target: < 0.5 s.
* ``idle_pN``, ``dirty_50_pN`` (``--parallel 0,1,2,4``): ``idle`` and ``dirty_50`` with
  RAM over N parallel data channels (0: in the main connection); ``idle`` and
  ``dirty_50`` themselves use the host's default.
* ``tls_idle``: ``idle`` between two hosts serving mutual TLS (``host serve --tls-dir``),
  with its ratio to the plaintext run of the same process.  ``--tls-only`` runs just the
  two idle cases (plaintext and TLS).

Each vmferry job reports the downtime it predicted at the stop decision; the prediction
error per case is reported beside the target of +-15 %.  Runs alternate (vmferry idle,
QEMU single, QEMU multifd, then the other cases) so machine load hits all alike; figures
are medians over ``--runs``.

    python benchmarks/migration_throughput.py [--runs 2] [--memory-mib 2048] [--no-qemu]
        [--parallel 0,1,2,4] [--idle-only]
"""

from __future__ import annotations

import argparse
import asyncio
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

from jobstats import final_pass

from vmferry.host.client import HostClient
from vmferry.host.processes import spawn_host
from vmferry.host.tls import make_certs

MIB = 1024 * 1024
QEMU = "qemu-system-x86_64"


# --- vmferry -----------------------------------------------------------------------------


def vmferry_case(
    a: HostClient, b: HostClient, b_url: str, name: str, definition: dict[str, Any],
    warmup: float, params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    a.post("/v1/vms", {"definition": {"name": name, **definition}, "start": True})
    time.sleep(warmup)
    job = a.post(f"/v1/vms/{name}/migrate",
                 {"destination": b_url, "params": {"verify": False, **(params or {})}})
    deadline = time.monotonic() + 600
    while job["status"] not in ("completed", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"migration of {name} did not finish")
        time.sleep(0.02)  # as often as QEMU's query-migrate below: the polls cost CPU
        job = a.get(f"/v1/jobs/{job['id']}")
    for host in (a, b):
        with contextlib.suppress(Exception):
            host.delete(f"/v1/vms/{name}")
    st = job["stats"]
    size = definition["memory_mib"] * MIB
    return {
        "status": job["status"],
        **({"error": job.get("error", "")} if job["status"] != "completed" else {}),
        "total_time_ms": round(st["total-time"], 1),
        "downtime_ms": round(st["downtime"], 1),
        "predicted_downtime_ms": st.get("predicted-downtime", 0.0),
        "prediction_error_pct": st.get("downtime-prediction-error-pct"),
        "downtime_breakdown": st["downtime-breakdown"],
        "predicted_breakdown": st.get("predicted-downtime-breakdown", {}),
        "prediction_inputs": st.get("prediction-inputs", {}),
        "switchover_parts": st.get("switchover-parts", {}),
        **final_pass(st),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "passes": len(st["passes"]),
        "parallel": job.get("progress", {}).get("parallel", 0),
        "transferred": st["ram"]["transferred"],
        "device_bytes": st.get("device-bytes", 0),
        "gb_per_s": round(size / (st["total-time"] / 1e3) / 1e9, 3),
    }


def tls_case(work: Path, definition: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """The idle case between two TLS hosts, and its ratio to the plaintext run."""
    make_certs(work / "pki", ["C", "D"])
    hosts = [spawn_host("C", work / "C", tls_dir=work / "pki" / "C"),
             spawn_host("D", work / "D", tls_dir=work / "pki" / "D")]  # fmt: skip
    try:
        c, d = hosts[0].client(600), hosts[1].client(600)
        out = vmferry_case(c, d, hosts[1].control_url, "idle-tls", definition, 0.2)
    finally:
        for h in hosts:
            h.stop()
    out["ratio_to_plaintext"] = round(out["gb_per_s"] / plain["gb_per_s"], 3)
    return out


# --- QEMU --------------------------------------------------------------------------------


def ensure_qemu() -> str:
    if shutil.which(QEMU) is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "qemu-system-x86"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def prefill(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(0, size, 64 * MIB):
            f.write(os.urandom(64 * MIB))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _qmp(path: Path) -> Any:
    from qemu.qmp import QMPClient

    qmp = QMPClient("vmferry-bench")
    for _ in range(400):
        try:
            await qmp.connect(str(path))
            return qmp
        except Exception:  # not listening yet
            await asyncio.sleep(0.05)
    raise RuntimeError(f"QEMU did not open {path}")


async def _qemu_migrate(src_sock: Path, dst_sock: Path, port: int, multifd: int) -> Any:
    src, dst = await _qmp(src_sock), await _qmp(dst_sock)
    try:
        await src.execute("cont")
        await asyncio.sleep(0.5)
        for q in (src, dst):
            if multifd:
                await q.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "multifd", "state": True}]})  # fmt: skip
                await q.execute("migrate-set-parameters", {"multifd-channels": multifd})
        # QEMU's default max-bandwidth is 128 MiB/s: lift it (the largest it takes)
        await src.execute("migrate-set-parameters", {"max-bandwidth": 2**53 - 1})
        await dst.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            info = await src.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            await asyncio.sleep(0.02)
        raise RuntimeError("QEMU migration did not finish in 600 s")
    finally:
        for q in (src, dst):
            with contextlib.suppress(Exception):
                await q.execute("quit")
            with contextlib.suppress(Exception):
                await q.disconnect()


def qemu_case(work: Path, mem_file: Path, mib: int, multifd: int) -> dict[str, Any]:
    common = [QEMU, "-accel", "kvm", "-M", "pc", "-m", f"{mib}M", "-nodefaults",
              "-display", "none", "-serial", "none", "-monitor", "none"]  # fmt: skip
    src_sock, dst_sock = work / "qsrc.sock", work / "qdst.sock"
    for s in (src_sock, dst_sock):
        s.unlink(missing_ok=True)
    src_cmd = [*common, "-object",
               f"memory-backend-file,id=mem,size={mib}M,mem-path={mem_file},share=on",
               "-machine", "memory-backend=mem", "-S",
               "-qmp", f"unix:{src_sock},server=on,wait=off"]  # fmt: skip
    # plain anonymous RAM, under the same RAM block name as the source's
    dst_cmd = [*common, "-object", f"memory-backend-ram,id=mem,size={mib}M",
               "-machine", "memory-backend=mem", "-incoming", "defer",
               "-qmp", f"unix:{dst_sock},server=on,wait=off"]  # fmt: skip
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for c in (src_cmd, dst_cmd)]  # fmt: skip
    try:
        info = asyncio.run(_qemu_migrate(src_sock, dst_sock, free_port(), multifd))
    finally:
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if info.get("status") != "completed":
        err = b"".join(p.stderr.read() for p in procs if p.stderr).decode(errors="replace")
        raise RuntimeError(f"QEMU migration {info.get('status')}: "
                           f"{info.get('error-desc', '')} {err.strip()}")
    ram = info.get("ram", {})
    total = float(info.get("total-time", 0))
    return {
        "status": info.get("status"),
        "total_time_ms": total,
        "downtime_ms": float(info.get("downtime", 0)),
        "transferred": ram.get("transferred"),
        "gb_per_s": round(mib * MIB / (total / 1e3) / 1e9, 3) if total else 0.0,
        "mbps": ram.get("mbps"),
    }


# --- device state ------------------------------------------------------------------------


DEVICE_CASES = ("device_64", "device_64_p0", "device_64_p4", "device_64_stopcopy",
                "device_64_stopcopy_p0", "device_64_stopcopy_p4")
STOPCOPY_BASE = "device_64_stopcopy"


def device_cases(a: HostClient, b: HostClient, b_url: str, n: int,
                 results: dict[str, list[dict[str, Any]]]) -> None:  # fmt: skip
    """64 MiB of device state: pre-copy with switchover-ack (mlx5-like), then all of it
    in the stop (pds-like, the baseline)."""
    # parallel None: the host's default data channels (what the target is about)
    for case, driver, parallel in (("device_64", "mlx5", None), ("device_64_p0", "mlx5", 0),
                                   ("device_64_p4", "mlx5", 4),
                                   ("device_64_stopcopy", "pds", None),
                                   ("device_64_stopcopy_p0", "pds", 0),
                                   ("device_64_stopcopy_p4", "pds", 4)):  # fmt: skip
        device = {"id": "big0", "driver": driver, "state_mib": 64,
                  "dma_region": [MIB, 65536], "seed": n}  # fmt: skip
        results[case].append(vmferry_case(
            a, b, b_url, f"dev{n}{driver}{'d' if parallel is None else parallel}",
            {"memory_mib": 16, "fill": "zero", "workload": {"dirty_rate_mbps": 0},
             "devices": [device]}, 0.1,
            # stop-copy: the whole 64 MiB is downtime whatever the limit; a limit it can
            # meet lets it converge at a loaded machine's bandwidth
            {**({} if parallel is None else {"parallel": parallel}),
             **({"downtime_limit_ms": 5000} if driver == "pds" else {})}))  # fmt: skip


def device_report(report: dict[str, Any]) -> dict[str, Any]:
    """The device cases' downtimes and the ratio of pre-copy to the stop-copy baseline."""
    out: dict[str, Any] = {f"{k}_downtime_ms": report[k]["median_downtime_ms"]
                           for k in DEVICE_CASES}  # fmt: skip
    base = report[STOPCOPY_BASE]["median_downtime_ms"]
    for k in (c for c in DEVICE_CASES if c != STOPCOPY_BASE):
        out[f"{k}_vs_stopcopy"] = round(report[k]["median_downtime_ms"] / base, 3) \
            if base else None  # fmt: skip
    return out


# --- the run -----------------------------------------------------------------------------


def median(runs: list[dict[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else float("nan")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for key in ("total_time_ms", "downtime_ms", "gb_per_s", "predicted_downtime_ms",
                "prediction_error_pct"):  # fmt: skip
        if any(key in r for r in runs):
            out[f"median_{key}"] = median(runs, key)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--memory-mib", type=int, default=2048)
    ap.add_argument("--no-qemu", action="store_true", help="vmferry cases only")
    ap.add_argument("--tls-only", action="store_true", help="only idle: plaintext and TLS")
    ap.add_argument("--parallel", default="0,1,2,4",
                    help="data channel counts of the idle_pN cases (comma-separated)")
    ap.add_argument("--device-only", action="store_true",
                    help="only the 64 MiB device-state cases (pre-copy and stop-copy)")
    ap.add_argument("--idle-only", action="store_true",
                    help="only the idle cases (default, idle_pN and QEMU's)")
    args = ap.parse_args()
    mib = args.memory_mib
    work = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="vmferry-bench-", dir="/dev/shm"))
    results: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("idle", "qemu_single", "qemu_multifd4", "dirty_50", *DEVICE_CASES,
                        "zero_4g")}  # fmt: skip
    channels = [int(x) for x in args.parallel.split(",") if x.strip()]
    results.update({f"idle_p{p}": [] for p in channels})
    if not args.idle_only:
        results.update({f"dirty_50_p{p}": [] for p in channels})
    hosts = []
    qemu_version = ""
    try:
        if not args.no_qemu:
            qemu_version = ensure_qemu()
            prefill(shm / "ram", mib * MIB)
        hosts = [spawn_host("A", work / "A"), spawn_host("B", work / "B")]
        a, b = hosts[0].client(600), hosts[1].client(600)
        b_url = hosts[1].control_url
        if args.device_only:
            # one idle migration first: it measures the link's bandwidth, which the
            # stop-copy cases' small passes cannot (their 64 MiB is all in the stop)
            warmup = vmferry_case(a, b, b_url, "warmup",
                                  {"memory_mib": 512, "vcpus": 2, "fill": "random"}, 0.2)
            for n in range(args.runs):
                device_cases(a, b, b_url, n, results)
            report = {k: summary(results[k]) for k in DEVICE_CASES}
            print(json.dumps({"runs": args.runs, "warmup_gb_per_s": warmup["gb_per_s"],
                              **report, **device_report(report),
                              "load_average": os.getloadavg()}, indent=2))  # fmt: skip
            return
        if args.tls_only:
            idle_def = {"memory_mib": mib, "vcpus": 2, "fill": "random"}
            plain = vmferry_case(a, b, b_url, "idle", idle_def, 0.2)
            print(json.dumps({"idle": plain, "tls_idle": tls_case(work, idle_def, plain)},
                             indent=2))  # fmt: skip
            return
        for n in range(args.runs):
            results["idle"].append(vmferry_case(
                a, b, b_url, f"idle{n}", {"memory_mib": mib, "vcpus": 2, "fill": "random"},
                0.2))  # fmt: skip
            if not args.no_qemu:
                results["qemu_single"].append(qemu_case(work, shm / "ram", mib, 0))
            for p in channels:
                results[f"idle_p{p}"].append(vmferry_case(
                    a, b, b_url, f"idle{n}p{p}",
                    {"memory_mib": mib, "vcpus": 2, "fill": "random"}, 0.2,
                    {"parallel": p}))  # fmt: skip
            if not args.no_qemu:
                results["qemu_multifd4"].append(qemu_case(work, shm / "ram", mib, 4))
            if args.idle_only:
                continue
            results["dirty_50"].append(vmferry_case(
                a, b, b_url, f"dirty{n}",
                {"memory_mib": mib, "vcpus": 2, "fill": "random",
                 "workload": {"dirty_rate_mbps": 50, "pattern": "hot"}}, 1.0,
                {"downtime_limit_ms": 50}))  # fmt: skip
            for p in channels:
                results[f"dirty_50_p{p}"].append(vmferry_case(
                    a, b, b_url, f"dirty{n}p{p}",
                    {"memory_mib": mib, "vcpus": 2, "fill": "random",
                     "workload": {"dirty_rate_mbps": 50, "pattern": "hot"}}, 1.0,
                    {"downtime_limit_ms": 50, "parallel": p}))  # fmt: skip
            device_cases(a, b, b_url, n, results)
            results["zero_4g"].append(vmferry_case(
                a, b, b_url, f"zero{n}", {"memory_mib": 4096, "vcpus": 2, "fill": "zero"},
                0.1))  # fmt: skip
        tls: dict[str, Any] = {"skipped": "--idle-only"}
        if not args.idle_only:
            try:  # reported, never fatal: the figures above must still come out
                tls = tls_case(work, {"memory_mib": mib, "vcpus": 2, "fill": "random"},
                               results["idle"][-1])  # fmt: skip
            except Exception as exc:
                tls = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        for h in hosts:
            h.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)

    report: dict[str, Any] = {"qemu": qemu_version, "runs": args.runs, "memory_mib": mib,
                              "load_average": os.getloadavg()}  # fmt: skip
    report.update({k: summary(v) for k, v in results.items() if v})
    report["tls_idle"] = tls
    idle = report["idle"]["median_gb_per_s"]
    targets: dict[str, Any] = {}
    if not args.no_qemu:
        best = max(report["qemu_single"]["median_gb_per_s"],
                   report["qemu_multifd4"]["median_gb_per_s"])  # fmt: skip
        report["ratios"] = {
            "idle_vs_qemu_single": round(idle / report["qemu_single"]["median_gb_per_s"], 3),
            "idle_vs_qemu_multifd4": round(idle / report["qemu_multifd4"]["median_gb_per_s"],
                                           3),  # fmt: skip
            "idle_vs_best_qemu": round(idle / best, 3),
            **{f"idle_p{p}_vs_best_qemu":
               round(report[f"idle_p{p}"]["median_gb_per_s"] / best, 3) for p in channels},
        }
        targets["idle>=2x_best_qemu"] = idle >= 2 * best
    if args.idle_only:
        report["targets"] = targets
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    targets["dirty_50_downtime<=50ms"] = report["dirty_50"]["median_downtime_ms"] <= 50
    targets["device_64_downtime<100ms"] = report["device_64"]["median_downtime_ms"] < 100
    report["device"] = device_report(report)
    targets["zero_4g<0.5s"] = report["zero_4g"]["median_total_time_ms"] < 500
    errors = {k: report[k]["median_prediction_error_pct"]
              for k in report if isinstance(report[k], dict)
              and "median_prediction_error_pct" in report[k]}  # fmt: skip
    report["prediction_error_pct"] = errors
    targets["prediction_within_15pct"] = all(abs(e) <= 15 for e in errors.values())
    report["targets"] = targets
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
