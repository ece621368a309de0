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
removed (the scenarios had none then, so that search never computed one); ``speedup`` is
the current engine's schedules/s over the baseline's for the same kind of search.

Then, for the ``--workers-scenarios`` (default ``iommu-probe``), ``dpor`` split at depth
``--split-depth`` (default 3) in one process and on 2 Ray workers (local runtime, one
task per subtree), if Ray is installed; the two reports must be the same.  Prints one JSON object.

    python benchmarks/explore_throughput.py [--baseline-rev 94afd01] [--no-ray]
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from vmferry import sync
from vmferry.analysis.explore import run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios

STRATEGIES = {"naive": ("naive", False), "sleep": ("sleep", False), "dpor": ("dpor", True),
              "dpor-stateless": ("dpor", False)}


def measure(scenario: str, strategy: str, workers: int = 1, *,
            state_hashing: bool = False, split_depth: int = 0) -> dict[str, Any]:
    sc = all_scenarios()[scenario]
    started = time.perf_counter()
    report = run_scenario(sc, strategy=strategy, failures_dir=None, workers=workers,
                          state_hashing=state_hashing, split_depth=split_depth)
    elapsed = time.perf_counter() - started
    assert report.complete and not report.failures, (scenario, strategy, report.failures[:1])
    return {"schedules": report.schedules_explored, "pruned": report.pruned,
            "pruned_by_state": report.pruned_by_state, "seconds": round(elapsed, 3),
            "schedules_per_s": round(report.schedules_explored / elapsed, 1),
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


def baseline(engine: ModuleType, por: bool) -> dict[str, Any]:
    sc = all_scenarios()["iommu-probe"]
    schedules, started = 0, time.perf_counter()
    for case in sc.cases:
        limits = engine.SearchLimits(sc.preemption_bound, None, None, sc.max_steps)
        limits.por = limits.state_hashing = por
        build = case.build
        stats = engine.search(lambda build=build: _stateless(build(sc.default_mode)), limits)
        schedules += stats.schedules
    elapsed = time.perf_counter() - started
    return {"schedules": schedules, "seconds": round(elapsed, 3),
            "schedules_per_s": round(schedules / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-rev", default="94afd01")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--workers-scenarios", default="iommu-probe")
    parser.add_argument("--split-depth", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    parser.add_argument("--state-hashing", default="vfio-data-stream",
                        help="scenarios also run with sleep sets plus state hashing")
    args = parser.parse_args()
    out: dict[str, Any] = {"benchmark": "explore_throughput", "scenarios": {}}
    for name, sc in all_scenarios().items():
        if args.only and name not in args.only.split(","):
            continue
        row: dict[str, Any] = {"mode": sc.default_mode, "preemption_bound": sc.preemption_bound}
        for label, (strategy, hashing) in STRATEGIES.items():
            row[label] = measure(name, strategy, state_hashing=hashing)
        if name in args.state_hashing.split(","):
            row["sleep+state"] = measure(name, "sleep", state_hashing=True)
        naive = row["naive"]["schedules"]
        row["reduction_factor"] = {
            s: round(naive / max(row[s]["schedules"], 1), 2)
            for s in ("sleep", "dpor", "dpor-stateless")
        }
        out["scenarios"][name] = row
        print(f"# {name} done", file=sys.stderr, flush=True)
    engine = legacy_engine(args.baseline_rev) if "iommu-probe" in out["scenarios"] else None
    if engine is not None:
        old = {"rev": args.baseline_rev, "sleep": baseline(engine, True),
               "naive": baseline(engine, False)}
        now = out["scenarios"]["iommu-probe"]
        old["speedup"] = {
            s: round(now[s]["schedules_per_s"] / old[s]["schedules_per_s"], 2)
            for s in ("sleep", "naive")
        }
        old["dpor_over_baseline_sleep_schedules_per_s"] = round(
            now["dpor"]["schedules_per_s"] / old["sleep"]["schedules_per_s"], 2)
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
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
