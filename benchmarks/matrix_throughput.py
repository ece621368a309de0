"""Throughput of the arm64 migration matrix: the full default matrix in one run.

Prints JSON: cells per second for the default (pre-flight) matrix and for the QEMU-mode
matrix -- each cell a real migration of a 1 MiB arm64 VM through the engine's sessions --
and, as baselines measured in the same run: bare firmware migrations (the cpreg lists
alone: boot, save, encode, decode, load, start, no engine, no pre-flight) over the same
(source, destination) pairs, and engine-only migrations of a 1 MiB generic VM.  Wall and
CPU seconds are both reported (the CPU figure is what the code costs on a shared machine).

Run: ``PYTHONPATH=src python benchmarks/matrix_throughput.py``.
"""

from __future__ import annotations

import itertools
import json
import time

from vmferry.analysis.matrix import LINK_BYTES_PER_S, run_matrix, specs, summary
from vmferry.clock import ManualClock
from vmferry.machine.arm64 import Arm64Machine, CpuLoadError, MergeMode, decode_state, encode_state
from vmferry.machine.profiles import list_profiles, load_profile
from vmferry.machine.vm import create_vm
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import StreamDecoder


def timed_matrix(compat: str) -> tuple[float, dict[str, object]]:
    start, cpu = time.perf_counter(), time.process_time()
    cells = run_matrix(specs(compat=compat))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    rate = len(cells) / elapsed
    return rate, {"cells": len(cells), "seconds": round(elapsed, 3),
                  "cpu_seconds": round(cpu, 3), "cells_per_second": round(rate, 1),
                  "cells_per_cpu_second": round(len(cells) / cpu, 1),
                  "outcomes": summary(cells)}


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


def engine_migrations(count: int) -> tuple[float, dict[str, object]]:
    """The engine alone: a 1 MiB generic VM through the sessions, as a cell moves one."""
    start = time.perf_counter()
    for _ in range(count):
        vm = create_vm({"name": "bench", "memory_mib": 1})
        vm.start()
        clock = ManualClock()
        src = SourceSession(vm, MigrationParams(), clock)
        src.preflight({})
        dst = DestinationSession(clock)
        decoder = StreamDecoder()
        bufs = src.start()
        while bufs:
            for buf in bufs:
                decoder.feed(buf)
                clock.advance(len(buf) / LINK_BYTES_PER_S)
            for rec in decoder.events():
                dst.receive(rec)
            bufs = src.next_buffers()
        src.complete(dst.finish())
        dst.hand_over().close()
        vm.close()
    elapsed = time.perf_counter() - start
    rate = count / elapsed
    return rate, {"migrations": count, "seconds": round(elapsed, 3),
                  "per_second": round(rate, 1)}


def main() -> None:
    base_rate, baseline = bare_migrations(repeat=9)
    engine_rate, engine = engine_migrations(576)
    pre_rate, preflight = timed_matrix("preflight")
    qemu_rate, qemu = timed_matrix("qemu")
    print(json.dumps({
        "benchmark": "matrix_throughput",
        "default_matrix_preflight": preflight,
        "matrix_qemu": qemu,
        "baseline_bare_migrations": baseline,
        "baseline_engine_generic_migrations": engine,
        "ratio_preflight_cells_vs_bare_migrations": round(pre_rate / base_rate, 3),
        "ratio_qemu_cells_vs_bare_migrations": round(qemu_rate / base_rate, 3),
        "ratio_preflight_cells_vs_engine_migrations": round(pre_rate / engine_rate, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
