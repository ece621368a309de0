"""The data channels' pass 1 with and without the snapshot copy, in one process.

A source VM of random RAM sends pass 1 (every page, the guest idle) and an empty final
pass through a ``ChannelSink`` over loopback into a ``ChannelGroup`` (the destination's
channel threads, receiving straight into a fresh VM's memory): once as to a destination
of channel protocol 1.2 (every run copied into a snapshot buffer before its checksum),
once as to one of 1.3 (LIVE records: checksummed and sent from guest memory, the OWED
reports read back).  The modes alternate; for each the medians of the wall time and of
the process's CPU time (both ends together, as on one machine) per GiB, and the ratios.

    python benchmarks/live_pages.py [--memory-mib 512] [--runs 3] [--channels 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np

from vmferry.clock import ManualClock
from vmferry.host.datachannels import ChannelGroup, ChannelSink, dial_channels
from vmferry.machine import create_vm
from vmferry.migration.source import MigrationParams, SourceSession

TOKEN = "0123456789abcdef0123456789abcdef"
GIB = 1024**3


def one(source: Any, live: bool, channels: int) -> dict[str, float]:
    dst = create_vm({"name": "bench", "memory_mib": source.ram.size >> 20, "vcpus": 1,
                     "fill": "zero"})  # fmt: skip
    session = SourceSession(source, MigrationParams(), ManualClock())
    group = ChannelGroup(TOKEN, dst.ram, "127.0.0.1", live=live)
    socks = dial_channels(("127.0.0.1", group.port), TOKEN, channels, None)
    sink = ChannelSink(socks, session, on_stall=lambda s: None, check=lambda: None,
                       live=live)  # fmt: skip
    npages = source.ram.npages
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        sink.send_pass(1, np.ones(npages, dtype=np.bool_), False)
        sink.send_pass(2, sink.owed_pages(np.zeros(npages, dtype=np.bool_)), True)
        group.wait_done(120, lambda: None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        sink.close()
        group.close()
    assert bytes(dst.ram.read(0, 1 << 20)) == bytes(source.ram.read(0, 1 << 20))
    gib = source.ram.size / GIB
    return {"wall_s": wall, "cpu_s_per_gib": cpu / gib, "gb_per_s": source.ram.size / wall / 1e9,
            "torn_records": sink.torn_records, "live_records": sink.live_records}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--channels", type=int, default=2)
    args = ap.parse_args()
    source = create_vm({"name": "bench", "memory_mib": args.memory_mib, "vcpus": 1,
                        "fill": "random"})  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {"snapshot": [], "live": []}
    for _ in range(args.runs):
        for mode in ("snapshot", "live"):
            runs[mode].append(one(source, mode == "live", args.channels))
    out: dict[str, Any] = {"memory_mib": args.memory_mib, "channels": args.channels,
                           "load_average": list(os.getloadavg()), "runs": runs}
    for mode, rs in runs.items():
        out[mode] = {k: round(statistics.median(r[k] for r in rs), 4)
                     for k in ("gb_per_s", "cpu_s_per_gib")}
    out["live_vs_snapshot"] = {
        "throughput": round(out["live"]["gb_per_s"] / out["snapshot"]["gb_per_s"], 3),
        "cpu_per_gib": round(out["live"]["cpu_s_per_gib"] / out["snapshot"]["cpu_s_per_gib"], 3),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
