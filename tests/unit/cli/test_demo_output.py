"""``vmferry demo`` says when a downtime overran its limit (issue 13, item 1: "a downtime
over its limit is a warning on the terminal"; the demo printed 474.8 ms against a 300 ms
limit without a word)."""

from __future__ import annotations

from typing import Any

from vmferry.cli import demo
from vmferry.cli.common import console
from vmferry.host.demo import _SUMMARY
from vmferry.host.outcome import downtime_overrun


def _report(downtime: float, limit: float) -> dict[str, Any]:
    stats = {"status": "completed", "downtime": downtime,
             "downtime-breakdown": {"verification_ms": 125.0}}
    warning = downtime_overrun(stats, limit)
    vm: dict[str, Any] = {"status": "completed", "downtime": downtime, "iterations": 1,
                          "verified": True, "devices": {},
                          "warnings": [warning] if warning else []}
    return {**vm, "passes": [], "setup-time": 10.0, "total-time": 2147.0,
            "downtime-breakdown": stats["downtime-breakdown"],
            "ram": {"total": 1 << 30, "transferred": 1 << 29, "normal": 1, "duplicate": 2,
                    "dirty-sync-count": 2},
            "verification": {"ram_equal": True, "vcpu_equal": True, "source": {"ram": "ab"}},
            "destination_runstate": "running", "backend": "kvm", "vms": {"demo-acc": vm}}


def test_issue13_1_demo_warns_of_a_downtime_over_its_limit() -> None:
    with console.capture() as cap:
        demo._print(_report(474.8, 300))
    out = " ".join(cap.get().split())  # the console folds long lines
    assert out.count("warning: downtime 474.8 ms exceeded the limit of 300 ms "
                     "(verification took 125.0 ms of it)") == 2  # demo-vm and demo-acc


def test_no_warning_within_the_limit() -> None:
    with console.capture() as cap:
        demo._print(_report(88.1, 300))
    assert "warning" not in cap.get()


def test_the_per_vm_summary_keeps_the_warnings() -> None:
    assert "warnings" in _SUMMARY
