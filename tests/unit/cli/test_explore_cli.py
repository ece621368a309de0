"""``vmferry explore`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from vmferry.cli.main import cli


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["explore", *args])
    return result.exit_code, result.output


def test_list_shows_scenarios_modes_and_default() -> None:
    code, out = run("races", "--list")
    assert code == 0
    assert "iommu-probe" in out and "v6_15 (default)" in out and "pre_6_7" in out
    code, out = run("races", "--list", "--json")
    data = json.loads(out)
    entry = next(s for s in data["scenarios"] if s["name"] == "iommu-probe")
    assert entry["default_mode"] == "v6_15" and "R1" in entry["cases"]


def test_faulty_mode_exits_1_with_failures_json(tmp_path: Path) -> None:
    code, out = run("races", "--scenario", "iommu-probe", "--mode", "pre_6_7", "--case", "R1",
                    "--json", "--failures-dir", str(tmp_path))
    assert code == 1
    data = json.loads(out)  # exactly one JSON object
    assert data["scenario"] == "iommu-probe" and data["mode"] == "pre_6_7"
    assert data["schedules_explored"] > 0 and data["failures"]
    failure = data["failures"][0]
    assert {"case", "hazard", "message", "schedule"} <= set(failure)
    assert failure["case"] == "R1"
    assert (failure["hazard"], failure["message"]) in {
        ("invariant-violation", "InvariantViolation: D ends in S0, not S5"),
        ("null-deref", "NullDeref: NULL pointer dereference: D->iommu in dev_iommu_fwspec_set"),
        ("use-after-free", "UseAfterFree: fwspec#2 used after free"),
    }
    saved = list(tmp_path.iterdir())
    assert saved
    code, out = run("replay", str(saved[0]))
    assert code == 1 and "reproduced" in out


def test_correct_mode_exits_0(tmp_path: Path) -> None:
    code, out = run("races", "--scenario", "iommu-probe", "--case", "R5", "--failures-dir",
                    str(tmp_path))
    assert code == 0 and "ok" in out and "complete=True" in out


def test_random_strategy_json(tmp_path: Path) -> None:
    code, out = run("races", "--scenario", "iommu-probe", "--case", "R2", "--strategy",
                    "random", "--seed", "3", "--max-schedules", "20", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["strategy"] == "random" and data["schedules_explored"] == 20
    assert data["complete"] is False


def test_bad_arguments() -> None:
    assert run("races")[0] == 2
    assert run("races", "--scenario", "nope")[0] == 2
    assert run("races", "--scenario", "iommu-probe", "--mode", "nope")[0] == 2
    assert run("races", "--scenario", "iommu-probe", "--preemption-bound", "-1")[0] == 2


def test_replay_rejects_malformed_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.replay"
    bad.write_text("garbage\n")
    code, out = run("replay", str(bad))
    assert code == 2 and "expected" in out


def test_issue13_list_never_truncates_a_mode_name() -> None:
    result = CliRunner().invoke(cli, ["explore", "races", "--list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert "…" not in result.output
    assert "v6_15+cleanup_overreach+relock_no_recheck" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_issue13_races_progress_lines_when_piped(monkeypatch: Any, tmp_path: Path) -> None:
    """Piped, `explore races` says what it explored while it works (a line every few
    seconds: here every schedule), with schedules, failing ones found and the rate."""
    from vmferry.cli import explore as explore_cli

    monkeypatch.setattr(explore_cli, "LINE_EVERY_S", 0.0)
    result = CliRunner().invoke(cli, ["explore", "races", "--scenario", "iommu-probe",
                                      "--mode", "pre_6_7", "--case", "R1", "--strategy",
                                      "naive", "--failures-dir", str(tmp_path)],
                            catch_exceptions=False)
    lines = [line for line in result.stderr.splitlines() if "schedules explored" in line]
    assert len(lines) >= 2, result.stderr
    counts = [int(line.split(": ", 1)[1].split()[0]) for line in lines]
    assert counts == sorted(counts) and counts[-1] >= 1
    assert "failing found" in lines[-1] and "schedules/s" in lines[-1]
    assert int(lines[-1].split("failing found")[0].split()[-1]) >= 1  # pre_6_7 R1 fails


def test_issue13_engine_progress_callback_sees_every_run() -> None:
    from vmferry.analysis.explore import run_scenario
    from vmferry.analysis.explore.runner import ExploreProgress
    from vmferry.analysis.explore.scenarios import all_scenarios

    seen: list[ExploreProgress] = []
    report = run_scenario(all_scenarios()["iommu-probe"], mode="pre_6_7", case="R1",
                          strategy="naive", failures_dir=None, progress=seen.append)
    assert seen and seen[-1].schedules == report.schedules_explored
    assert seen[-1].failing == report.failing_schedules
    assert len(seen) == report.schedules_explored + report.pruned
