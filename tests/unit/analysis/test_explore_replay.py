"""Issue 15 item 3: replay always works.

Every faulty mode of every registered scenario (the registry is iterated, so a scenario
added later is covered without touching this file) saves a failing schedule that
``explore replay`` reproduces with exit status 1; a schedule that now passes exits 0; an
unusable file exits 2 with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.unit.analysis.faulty import faulty_modes

from vmferry.analysis.explore import parse_script, replay, run_scenario
from vmferry.analysis.explore.report import Failure
from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.cli.main import cli

FAULTY = faulty_modes()


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["explore", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize(("scenario", "mode", "case"), FAULTY, ids=["/".join(f) for f in FAULTY])
def test_item3_every_faulty_mode_replays(
    scenario: str, mode: str, case: str, tmp_path: Path
) -> None:
    report = run_scenario(all_scenarios()[scenario], mode=mode, case=case,
                          failures_dir=tmp_path, stop_on_failure=True)
    hazards = [f.hazard for f in report.failures]
    assert hazards, f"{scenario} {mode} {case}: no failing schedule found"
    assert "exception" not in hazards, report.failures[0].message  # a model crash
    failure = report.failures[0]
    assert failure.path is not None
    result = replay(failure.path)
    assert result.reproduced, (result.failure, failure.message)
    assert result.failure is not None and result.failure.schedule == failure.schedule
    code, out = _cli("replay", "--json", failure.path)
    assert code == 1, out
    assert json.loads(out)["status"] == "reproduced"


def test_item3_labels_with_edge_whitespace_survive_the_script() -> None:
    schedule = (("mobility", "of_node_get "), ("reader", " lead"), ("reader", '"quoted"'),
                ("reader", "tab\tinside"), ("reader", "plain label"))
    failure = Failure("c", "h", "m", schedule, scenario="s", mode="m")
    assert parse_script(failure.script()).schedule == schedule


def test_item3_replay_exit_codes(tmp_path: Path) -> None:
    scenario = all_scenarios()["tce-indirect"]
    report = run_scenario(scenario, mode="double_read", case="t1-valid",
                          failures_dir=tmp_path, stop_on_failure=True)
    path = report.failures[0].path
    assert path is not None
    # the same schedule against the correct mode no longer fails (or no longer fits)
    script = Path(path).read_text().replace("mode double_read", "mode correct")
    fixed = tmp_path / "fixed.replay"
    fixed.write_text(script)
    code, out = _cli("replay", str(fixed))
    assert code in (0, 2), out
    if code == 0:
        assert "now passes" in out
    # unusable files: missing, malformed, unknown scenario, schedule that does not fit
    assert _cli("replay", str(tmp_path / "missing.replay"))[0] == 2
    bad = tmp_path / "bad.replay"
    bad.write_text("vmferry-explore-replay 1\nscenario nope\nmode m\ncase c\nhazard h\n"
                   "message m\nstep A start\n")
    code, out = _cli("replay", "--json", str(bad))
    assert code == 2 and "unknown scenario" in json.loads(out)["reason"]
    short = tmp_path / "short.replay"
    short.write_text("\n".join(Path(path).read_text().splitlines()[:7]) + "\n")
    code, out = _cli("replay", str(short))
    assert code == 2 and "recorded steps" in out
