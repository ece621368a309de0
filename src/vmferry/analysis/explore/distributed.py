"""Exploration spread over Ray workers.

The schedule tree of a scenario is split at its cases: each case's bounded search is an
independent task (its own instance factory, its own DFS), so ``N`` Ray workers explore up
to ``N`` cases at once.  Each task returns a partial :class:`Report`; they are merged in
the scenario's case order, so the merged report -- schedule counts, pruned counts, failures
and their order -- is identical to a single-process run's.  Only the wall time differs.

With a split depth (``--split-depth K``) each case's tree is split further, below the
nodes at depth ``K`` (:func:`vmferry.analysis.explore.dpor.split`, run here, in the
driver): every subtree is a task, and the parts come back in depth-first order, case by
case, to be folded as one process folds them.  The split is part of the search (a single
process with the same ``K`` searches the same subtrees), so again only the wall time
differs.

Ray is an optional dependency (``pip install 'vmferry[ray]'``).  ``address`` joins an
existing cluster (``ray.init(address=...)``); without it a local Ray runtime with
``workers`` CPUs is started and shut down again after the run.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from vmferry.analysis.explore.cases import Part, explore_case, factory_of, fold, subtree_part
from vmferry.analysis.explore.dpor import split
from vmferry.analysis.explore.engine import Node, SearchLimits
from vmferry.analysis.explore.report import Report
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.errors import ConfigError

RAY_HINT = "exploring with --workers needs Ray: pip install 'vmferry[ray]'"


def _ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigError(RAY_HINT) from exc


def explore_case_task(
    scenario_name: str, case_name: str, mode: str, limits: SearchLimits, seed: int,
    strategy: str, bound: int | None,
) -> Report:
    """One case of a registered scenario, explored in this process (a Ray task body)."""
    scenario = all_scenarios()[scenario_name]
    (case,) = [c for c in scenario.cases if c.name == case_name]
    part = Report(scenario_name, mode, strategy, preemption_bound=bound, seed=seed)
    part.cases.append(case_name)
    explore_case(part, case_name, factory_of(case, mode), limits, seed)
    return part


def run_cases(
    scenario_name: str, cases: list[str], mode: str, limits: SearchLimits, seed: int,
    strategy: str, bound: int | None, *, workers: int, address: str | None,
) -> list[Report]:
    """Explore ``cases`` as Ray tasks; the partial reports come back in ``cases`` order."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        if limits.split_depth:
            return _run_split(ray, scenario_name, cases, mode, limits, seed, strategy, bound)
        task: Callable[..., Any] = ray.remote(num_cpus=1)(explore_case_task).remote
        refs = [task(scenario_name, case, mode, limits, seed, strategy, bound)
                for case in cases]
        return list(ray.get(refs))
    finally:
        if started:
            ray.shutdown()


def explore_subtree_task(scenario_name: str, case_name: str, mode: str,
                         limits: SearchLimits, nodes: list[Node]) -> Part:
    """One subtree of a case, searched in this process (a Ray task body)."""
    scenario = all_scenarios()[scenario_name]
    (case,) = [c for c in scenario.cases if c.name == case_name]
    return subtree_part(case_name, factory_of(case, mode), limits, nodes)


def _run_split(ray: Any, scenario_name: str, cases: list[str], mode: str,
               limits: SearchLimits, seed: int, strategy: str, bound: int | None
               ) -> list[Report]:
    scenario = all_scenarios()[scenario_name]
    task: Callable[..., Any] = ray.remote(num_cpus=1)(explore_subtree_task).remote
    started = time.perf_counter()
    pending: list[tuple[str, Part, list[Any]]] = []
    for name in cases:
        (case,) = [c for c in scenario.cases if c.name == name]
        subtrees, cut = split(factory_of(case, mode), limits, limits.split_depth)
        head = Part(cut.schedules, cut.pruned, cut.pruned_by_state, cut.complete)
        pending.append((name, head, [task(scenario_name, name, mode, limits, nodes)
                                     for nodes in subtrees]))
    parts: list[Report] = []
    for name, head, refs in pending:
        for part in ray.get(refs):
            head.add(part)
        report = Report(scenario_name, mode, strategy, preemption_bound=bound, seed=seed)
        report.cases.append(name)
        fold(report, name, head, 0.0)
        parts.append(report)
    if parts:
        parts[-1].elapsed_s = time.perf_counter() - started
    return parts
