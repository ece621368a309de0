"""Issue 10, item 1: CI's short soak -- 20 verified live migrations, 0 mismatches."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vmferry_bench_soak", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_issue10_1_soak_20_migrations_no_mismatch() -> None:
    report = _soak_module().soak(20)
    assert report["migrations"] == 20
    assert report["mismatches"] == 0 and report["failures"] == []
    assert report["completed"] == 20
    assert all(n >= 6 for n in report["per_pattern"].values())  # every pattern, both ways
