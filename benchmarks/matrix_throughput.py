"""Throughput of the arm64 migration matrix: the full default matrix in one run.

Prints JSON: cells per second for the default (pre-flight) matrix and for the QEMU-mode
matrix, and, as the baseline measured in the same run, the rate of bare migrations
(boot, save, encode, decode, load, start with no pre-flight and no guest judgement) over
the same (source, destination) pairs.

Run: ``PYTHONPATH=src python benchmarks/matrix_throughput.py``.
"""

from __future__ import annotations

import itertools
import json
import time

from vmferry.analysis.matrix import run_matrix, specs, summary
from vmferry.machine.arm64 import Arm64Machine, CpuLoadError, MergeMode, decode_state, encode_state
from vmferry.machine.profiles import list_profiles, load_profile


def timed_matrix(compat: str) -> tuple[float, dict[str, object]]:
    start = time.perf_counter()
    cells = run_matrix(specs(compat=compat))
    elapsed = time.perf_counter() - start
    rate = len(cells) / elapsed
    return rate, {"cells": len(cells), "seconds": round(elapsed, 3),
                  "cells_per_second": round(rate, 1), "outcomes": summary(cells)}


def bare_migrations(repeat: int) -> tuple[float, dict[str, object]]:
    profiles = [load_profile(n) for n in list_profiles()]
    pairs = list(itertools.product(profiles, profiles)) * repeat
    start = time.perf_counter()
    for src_profile, dst_profile in pairs:
        src = Arm64Machine(src_profile)
        src.start()
        data = encode_state(src.save())
        dst = Arm64Machine(dst_profile)
        try:
            dst.load(decode_state(data), MergeMode.CLASSIC)
            dst.start()
        except CpuLoadError:
            pass
    elapsed = time.perf_counter() - start
    rate = len(pairs) / elapsed
    return rate, {"migrations": len(pairs), "seconds": round(elapsed, 3),
                  "per_second": round(rate, 1)}


def main() -> None:
    base_rate, baseline = bare_migrations(repeat=9)
    pre_rate, preflight = timed_matrix("preflight")
    qemu_rate, qemu = timed_matrix("qemu")
    print(json.dumps({
        "benchmark": "matrix_throughput",
        "default_matrix_preflight": preflight,
        "matrix_qemu": qemu,
        "baseline_bare_migrations": baseline,
        "ratio_preflight_cells_vs_bare_migrations": round(pre_rate / base_rate, 3),
        "ratio_qemu_cells_vs_bare_migrations": round(qemu_rate / base_rate, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
