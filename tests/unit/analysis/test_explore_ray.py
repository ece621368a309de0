"""Issue 15 item 5: exploration on Ray workers gives the single-process report."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vmferry.analysis.explore import distributed as dist
from vmferry.analysis.explore import run_scenario
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.cli.main import cli
from vmferry.errors import ConfigError


def _summary(report: object) -> dict[str, object]:
    data = report.to_json()  # type: ignore[attr-defined]
    data.pop("elapsed_s")
    for failure in data["failures"]:
        failure.pop("path")
    return data


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[Any]:
    """One local 2-CPU Ray runtime for the module's tests (its start-up is most of
    their time)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_item5_two_ray_workers_match_one_process(tmp_path: Path, ray_runtime: Any) -> None:
    scenario = all_scenarios()["tce-indirect"]
    single = run_scenario(scenario, mode="upstream", preemption_bound=1, failures_dir=None)
    spread = run_scenario(scenario, mode="upstream", preemption_bound=1, workers=2,
                          failures_dir=tmp_path)
    assert ray_runtime.is_initialized()  # an existing runtime is used, not shut down
    assert "unvalidated-tce" in {f.hazard for f in single.failures}
    assert single.schedules_explored > 0
    assert _summary(spread) == _summary(single)
    assert all(f.path is not None and Path(f.path).is_file() for f in spread.failures)


def test_item5_ray_workers_split_by_prefix_match_one_process(tmp_path: Path,
                                                             ray_runtime: Any) -> None:
    """The tree split below the nodes at depth 3 (one task per subtree, DPOR backtrack
    points above the split dropped: every choice there is enumerated): two Ray workers
    report what one process does with the same split, failures in the same order."""
    scenario = all_scenarios()["iommu-probe"]
    kwargs: dict[str, object] = dict(mode="v6_15+no_default_domain_gate", case="R1",
                                     strategy="dpor", preemption_bound=1, split_depth=3)
    single = run_scenario(scenario, failures_dir=None, **kwargs)  # type: ignore[arg-type]
    spread = run_scenario(scenario, workers=2, failures_dir=None,
                          **kwargs)  # type: ignore[arg-type]
    naive = run_scenario(scenario, mode="v6_15+no_default_domain_gate", case="R1",
                         strategy="naive", preemption_bound=1, failures_dir=None)
    assert single.failures and {f.hazard for f in single.failures} == {
        f.hazard for f in naive.failures}
    assert _summary(spread) == _summary(single)


def test_item5_without_ray_workers_say_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def no_ray(name: str, *args: object) -> object:
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(dist.importlib, "import_module", no_ray)
    scenario = all_scenarios()["tce-indirect"]
    with pytest.raises(ConfigError, match=r"pip install 'vmferry\[ray\]'"):
        run_scenario(scenario, workers=2, failures_dir=None)
    result = CliRunner().invoke(cli, ["explore", "races", "--scenario", "tce-indirect",
                                      "--workers", "2"])
    assert result.exit_code == 2 and "vmferry[ray]" in result.output
