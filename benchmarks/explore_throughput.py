"""Explorer throughput on ``iommu-probe`` and the partial-order reduction's effect.

Runs, in one process and on the same scenario/mode/bound:

* naive bounded enumeration (no sleep sets, no state hashing) -- the baseline;
* the explorer's default search (sleep sets);
* seeded random walks;

and prints one JSON object: schedules explored, wall time and schedules per second for
each, and the reduction factor (naive schedules / reduced schedules) per case and overall.

    PYTHONPATH=src python benchmarks/explore_throughput.py [--bound 2] [--cases R1,R2,R3]
"""

from __future__ import annotations

import argparse
import json
import time

from vmferry.analysis.explore import explore
from vmferry.analysis.explore.scenarios.iommu_probe import SCENARIO


def measure(case: str, mode: str, bound: int, por: bool) -> dict[str, float]:
    build = next(c for c in SCENARIO.cases if c.name == case).build
    started = time.perf_counter()
    report = explore(lambda: build(mode), preemption_bound=bound, por=por,
                     state_hashing=False, max_steps=SCENARIO.max_steps, failures_dir=None)
    elapsed = time.perf_counter() - started
    assert report.complete and not report.failures, (case, mode, report.failures[:1])
    return {"schedules": report.schedules_explored, "pruned": report.pruned,
            "seconds": round(elapsed, 4),
            "schedules_per_s": round(report.schedules_explored / elapsed, 1)}


def random_rate(case: str, mode: str, runs: int) -> dict[str, float]:
    build = next(c for c in SCENARIO.cases if c.name == case).build
    started = time.perf_counter()
    report = explore(lambda: build(mode), strategy="random", seed=1, max_schedules=runs,
                     max_steps=SCENARIO.max_steps, failures_dir=None)
    elapsed = time.perf_counter() - started
    return {"schedules": report.schedules_explored, "seconds": round(elapsed, 4),
            "schedules_per_s": round(report.schedules_explored / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bound", type=int, default=2)
    parser.add_argument("--mode", default=SCENARIO.default_mode)
    parser.add_argument("--cases", default="R0,R1,R2,R3")
    parser.add_argument("--random-runs", type=int, default=500)
    args = parser.parse_args()
    per_case = {}
    totals = {"naive": 0.0, "reduced": 0.0, "naive_s": 0.0, "reduced_s": 0.0}
    for case in args.cases.split(","):
        naive = measure(case, args.mode, args.bound, por=False)
        reduced = measure(case, args.mode, args.bound, por=True)
        per_case[case] = {
            "naive": naive, "por": reduced,
            "reduction_factor": round(naive["schedules"] / reduced["schedules"], 2),
            "time_ratio": round(naive["seconds"] / reduced["seconds"], 2),
        }
        totals["naive"] += naive["schedules"]
        totals["reduced"] += reduced["schedules"]
        totals["naive_s"] += naive["seconds"]
        totals["reduced_s"] += reduced["seconds"]
    first = args.cases.split(",")[0]
    print(json.dumps({
        "benchmark": "explore_throughput",
        "scenario": SCENARIO.name, "mode": args.mode, "preemption_bound": args.bound,
        "cases": per_case,
        "total": {
            "naive_schedules": int(totals["naive"]),
            "por_schedules": int(totals["reduced"]),
            "reduction_factor": round(totals["naive"] / totals["reduced"], 2),
            "naive_schedules_per_s": round(totals["naive"] / totals["naive_s"], 1),
            "por_schedules_per_s": round(totals["reduced"] / totals["reduced_s"], 1),
            "time_ratio": round(totals["naive_s"] / totals["reduced_s"], 2),
        },
        "random_walk": random_rate(first, args.mode, args.random_runs),
    }, indent=2))


if __name__ == "__main__":
    main()
