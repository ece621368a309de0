"""Issue 17 item 5: the benchmark's 64 MiB device-state cases measure what the target
names -- the downtime *by default*, i.e. with the host's default data channels."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # it imports its sibling jobstats
    try:
        spec = importlib.util.spec_from_file_location("vmferry_bench_throughput",
                                                      BENCH / "migration_throughput.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_issue17_item5_device_64_runs_with_the_default_channels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = _bench()
    seen: dict[str, dict[str, Any]] = {}

    def fake_case(a: object, b: object, url: str, name: str, definition: dict[str, Any],
                  warmup: float, params: dict[str, Any] | None = None) -> dict[str, Any]:
        seen[name] = {"params": params or {}, "driver": definition["devices"][0]["driver"]}
        return {"downtime_ms": 1.0}

    monkeypatch.setattr(mod, "vmferry_case", fake_case)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in mod.DEVICE_CASES}
    mod.device_cases(None, None, "", 0, results)
    assert all(len(v) == 1 for v in results.values())
    by_case = dict(zip(mod.DEVICE_CASES, seen.values(), strict=True))
    # the target's cases name no channel count: the host's default applies
    assert "parallel" not in by_case["device_64"]["params"]
    assert "parallel" not in by_case["device_64_stopcopy"]["params"]
    assert by_case["device_64"]["driver"] == "mlx5"
    assert by_case["device_64_stopcopy"]["driver"] == "pds"
    # and the main stream and four channels beside them, named so
    assert by_case["device_64_p0"]["params"]["parallel"] == 0
    assert by_case["device_64_p4"]["params"]["parallel"] == 4
    assert by_case["device_64_stopcopy_p0"]["params"]["parallel"] == 0
    assert by_case["device_64_stopcopy_p4"]["params"]["parallel"] == 4
