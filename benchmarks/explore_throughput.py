"""Explorer throughput and reduction, per scenario and strategy, in one run.

For every registered scenario (default mode, the scenario's preemption bound, every case)
it runs the ``naive``, ``sleep`` (sleep sets, no state hashing: the search as it was),
``dpor`` (lock-aware; stateful where the scenario opts in) and ``dpor-stateless`` and reports
schedules explored, runs pruned, wall time, schedules per second, and the reduction factor
(naive schedules / schedules); ``--state-hashing`` names scenarios also run with sleep
sets plus state hashing (slower per schedule: the key fingerprints the model and every
thread's frames).

Baseline: the engine as it was before issue 15 (``--baseline-rev``, read from git and
loaded beside the current one) runs its sleep-set search and its naive enumeration on the
same ``iommu-probe`` cases in the same process, with the instances' state fingerprints
removed (the scenarios had none then, so that search never computed one).  Case by case,
the baseline search and the current one of the same kind (naive; sleep sets without state
hashing) run one right after the other, so that both see the same load on a shared
machine; ``speedup`` is the current engine's schedules/s over the baseline's, by wall time
and by CPU time of this process (the steadier of the two when other work shares the
cores).  The baseline counts other schedules than today's engine (its scenarios and its
search differed), so the comparison is per schedule, not per search.

Then, for the ``--workers-scenarios`` (default ``iommu-probe``), ``dpor`` split at depth
``--split-depth`` (default 3) in one process and on 2 Ray workers (local runtime, one
task per subtree), if Ray is installed; the two reports must be the same.  Prints one JSON object.

``--only`` restricts the scenarios and ``--strategies`` the strategies (``naive`` always
runs: it is the reference of the reduction factor).

    python benchmarks/explore_throughput.py [--baseline-rev 94afd01] [--no-ray]
        [--only iommu-probe] [--strategies naive,sleep]
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from vmferry import sync
from vmferry.analysis.explore import run_scenario
from vmferry.analysis.explore.dpor import search
from vmferry.analysis.explore.engine import SearchLimits
from vmferry.analysis.explore.scenarios import all_scenarios

STRATEGIES = {"naive": ("naive", False), "sleep": ("sleep", False), "dpor": ("dpor", True),
              "dpor-stateless": ("dpor", False)}


def measure(scenario: str, strategy: str, workers: int = 1, *,
            state_hashing: bool = False, split_depth: int = 0) -> dict[str, Any]:
    sc = all_scenarios()[scenario]
    started, cpu = time.perf_counter(), time.process_time()
    report = run_scenario(sc, strategy=strategy, failures_dir=None, workers=workers,
                          state_hashing=state_hashing, split_depth=split_depth)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert report.complete and not report.failures, (scenario, strategy, report.failures[:1])
    return {"schedules": report.schedules_explored, "pruned": report.pruned,
            "pruned_by_state": report.pruned_by_state, "seconds": round(elapsed, 3),
            "cpu_seconds": round(cpu, 3),
            "schedules_per_s": round(report.schedules_explored / elapsed, 1),
            "schedules_per_cpu_s": round(report.schedules_explored / max(cpu, 1e-9), 1),
            "runs_per_s": round((report.schedules_explored + report.pruned) / elapsed, 1)}


def legacy_engine(rev: str) -> ModuleType | None:
    """The explorer engine at ``rev`` (with its ``search``, from ``dpor.py`` where it
    lives there), loaded as a separate module (None without git)."""
    engine = _load(rev, "engine.py", "explore_engine_baseline")
    if engine is None:
        return None
    _hook_per_context(engine)
    if not hasattr(engine, "search"):
        current = sys.modules["vmferry.analysis.explore.engine"]
        sys.modules["vmferry.analysis.explore.engine"] = engine
        try:
            dpor = _load(rev, "dpor.py", "explore_dpor_baseline")
        finally:
            sys.modules["vmferry.analysis.explore.engine"] = current
        if dpor is None:
            return None
        engine.search = dpor.search  # type: ignore[attr-defined]
    return engine


def _load(rev: str, name: str, module_name: str) -> ModuleType | None:
    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{rev}:src/vmferry/analysis/explore/{name}"],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader(module_name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = f"{rev}:{name}"
    sys.modules[spec.name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _hook_per_context(engine: ModuleType) -> None:
    """Run a baseline engine from the days of the process-wide scheduler hook on today's
    per-context one: its execution object becomes the hook of each of its greenlets
    (``name`` and the four-argument ``wait`` added), put there by its own
    ``sync.scheduled`` calls, and so called with no wrapper in between."""
    name = "Execution" if hasattr(engine, "Execution") else "_Execution"
    legacy = getattr(engine, name)
    has_wait_access = hasattr(legacy, "wait_access")

    class Hooked(legacy):  # type: ignore[misc,valid-type]
        @property
        def name(self) -> str:
            return str(self.current_thread())

        def wait(self, label: str, ready: Any, obj: Any = None, write: bool = True) -> None:
            if has_wait_access:
                self.wait_access(label, ready, obj, write)
            else:
                super().wait(label, ready)

    if not hasattr(legacy, "acquire_point"):
        Hooked.acquire_point = lambda self, label, lock: self.yield_point(label, lock, True)
    setattr(engine, name, Hooked)
    engine.sync = _LegacySync()  # type: ignore[attr-defined]


class _LegacySync:
    """What a baseline engine used of ``vmferry.sync`` when the hook was process-wide:
    ``scheduled(execution)`` now puts the execution into the contexts of its greenlets
    (once; they keep it)."""

    MAIN_THREAD = sync.MAIN_THREAD
    ModelLock = sync.ModelLock
    Accesses = sync.Accesses
    __file__ = sync.__file__

    @staticmethod
    @contextlib.contextmanager
    def scheduled(execution: Any) -> Iterator[None]:
        for glet in execution.by_glet:
            if glet.gr_context is None:
                context = contextvars.Context()
                context.run(sync.set_hook, execution)
                glet.gr_context = context
        yield


def _stateless(instance: Any) -> Any:
    """The instance without its state fingerprint: the scenarios had none when the
    baseline engine was current, so its search never hashed states."""
    instance.state = None
    return instance


def _stateless_build(build: Any, mode: str) -> Any:
    return _stateless(build(mode))


def baseline(engine: ModuleType, por: bool) -> dict[str, Any]:
    """The baseline engine's search (sleep sets with ``por``, else naive) and the current
    one of the same kind on every ``iommu-probe`` case, case by case one after the other."""
    sc = all_scenarios()["iommu-probe"]
    totals = {"old": [0, 0.0, 0.0], "new": [0, 0.0, 0.0]}  # schedules, wall s, CPU s
    for case in sc.cases:
        build = case.build
        limits = engine.SearchLimits(sc.preemption_bound, None, None, sc.max_steps)
        limits.por = limits.state_hashing = por
        limits_now = SearchLimits(preemption_bound=sc.preemption_bound, max_steps=sc.max_steps,
                                  reduction="sleep" if por else "none", state_hashing=False)
        old_factory = functools.partial(_stateless_build, build, sc.default_mode)
        new_factory = functools.partial(build, sc.default_mode)
        for which, run in (
            ("old", functools.partial(engine.search, old_factory, limits)),
            ("new", functools.partial(search, new_factory, limits_now)),
        ):
            started, cpu = time.perf_counter(), time.process_time()
            schedules = run().schedules
            row = totals[which]
            row[0] += schedules
            row[1] += time.perf_counter() - started
            row[2] += time.process_time() - cpu
    out: dict[str, Any] = {}
    for which, (schedules, wall, cpu) in totals.items():
        out[which] = {"schedules": schedules, "seconds": round(wall, 3),
                      "cpu_seconds": round(cpu, 3),
                      "schedules_per_s": round(schedules / wall, 1),
                      "schedules_per_cpu_s": round(schedules / cpu, 1)}
    out["speedup"] = round(out["new"]["schedules_per_s"] / out["old"]["schedules_per_s"], 2)
    out["speedup_cpu"] = round(
        out["new"]["schedules_per_cpu_s"] / out["old"]["schedules_per_cpu_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-rev", default="94afd01")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--workers-scenarios", default="iommu-probe")
    parser.add_argument("--split-depth", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated strategies to run per scenario (default: all; "
                             "naive always runs: it is the reduction's reference)")
    parser.add_argument("--state-hashing", default="vfio-data-stream",
                        help="scenarios also run with sleep sets plus state hashing")
    args = parser.parse_args()
    out: dict[str, Any] = {"benchmark": "explore_throughput", "started": _now(),
                           "load_average_start": os.getloadavg(), "scenarios": {}}
    for name, sc in all_scenarios().items():
        if args.only and name not in args.only.split(","):
            continue
        row: dict[str, Any] = {"mode": sc.default_mode, "preemption_bound": sc.preemption_bound,
                               "dpor_stateful": sc.dpor_state_hashing}
        wanted = {"naive", *args.strategies.split(",")}
        for label, (strategy, hashing) in STRATEGIES.items():
            if label in wanted:
                row[label] = measure(name, strategy, state_hashing=hashing)
        if name in args.state_hashing.split(",") and "sleep" in wanted:
            row["sleep+state"] = measure(name, "sleep", state_hashing=True)
        naive = row["naive"]["schedules"]
        row["reduction_factor"] = {
            s: round(naive / max(row[s]["schedules"], 1), 2)
            for s in ("sleep", "dpor", "dpor-stateless") if s in row
        }
        out["scenarios"][name] = row
        print(f"# {name} done", file=sys.stderr, flush=True)
    engine = legacy_engine(args.baseline_rev) if "iommu-probe" in out["scenarios"] else None
    if engine is not None:
        old = {"rev": args.baseline_rev, "naive": baseline(engine, False),
               "sleep": baseline(engine, True)}
        now = out["scenarios"]["iommu-probe"]
        old["speedup"] = {s: old[s]["speedup"] for s in ("naive", "sleep")}
        old["speedup_cpu"] = {s: old[s]["speedup_cpu"] for s in ("naive", "sleep")}
        if "dpor-stateless" in now:
            old["dpor_stateless_over_baseline_sleep_schedules_per_s"] = round(
                now["dpor-stateless"]["schedules_per_s"]
                / old["sleep"]["old"]["schedules_per_s"], 2)
        out["baseline"] = old
    if not args.no_ray and importlib.util.find_spec("ray") is not None:
        out["workers"] = {}
        for name in args.workers_scenarios.split(","):
            if name not in out["scenarios"]:
                continue
            one = measure(name, "dpor", 1, state_hashing=True, split_depth=args.split_depth)
            two = measure(name, "dpor", 2, state_hashing=True, split_depth=args.split_depth)
            assert one["schedules"] == two["schedules"] and one["pruned"] == two["pruned"]
            out["workers"][name] = {
                "strategy": "dpor", "split_depth": args.split_depth,
                "schedules": one["schedules"], "one_process_s": one["seconds"],
                "two_workers_s": two["seconds"],
                "ratio": round(one["seconds"] / two["seconds"], 2)}
    out["load_average_end"] = os.getloadavg()
    out["finished"] = _now()
    print(json.dumps(out, indent=2))


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


if __name__ == "__main__":
    main()
