"""``explore fsm``: the command object, run through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vmferry.cli.explore_fsm import fsm_command


def test_command_name() -> None:
    assert fsm_command.name == "fsm"


def test_default_covers_all_four_flag_sets_and_rules_hold() -> None:
    result = CliRunner().invoke(fsm_command, ["--json"])
    assert result.exit_code == 0, result.output
    sets = json.loads(result.output)["flag_sets"]
    assert [s["flags"] for s in sets] == [1, 3, 5, 7]
    assert [len(s["pairs"]) for s in sets] == [16, 25, 25, 49]
    assert [len(s["arcs"]) for s in sets] == [6, 8, 9, 15]
    assert all(s["rules_ok"] and s["non_terminating"] == 0 for s in sets)


def test_one_flag_set_text() -> None:
    result = CliRunner().invoke(fsm_command, ["--flags", "stop_copy,p2p,pre_copy"])
    assert result.exit_code == 0
    assert "RUNNING -> STOP_COPY    RUNNING_P2P > STOP > STOP_COPY" in result.output
    assert "STOP_COPY -> PRE_COPY     EINVAL" in result.output


def test_faulty_mode_reports_non_termination() -> None:
    result = CliRunner().invoke(fsm_command, ["--flags", "stop_copy,pre_copy", "--json",
                                              "--mode", "error_sentinel_loop"])  # fmt: skip
    assert result.exit_code == 1
    (report,) = json.loads(result.output)["flag_sets"]
    bad = [p for p in report["pairs"] if str(p["error"]).startswith("non-termination")]
    assert [(p["from"], p["to"]) for p in bad] == [("STOP_COPY", "PRE_COPY")]


def test_dot_graph() -> None:
    result = CliRunner().invoke(fsm_command, ["--dot", "--flags", "stop_copy,p2p"])
    assert result.exit_code == 0
    assert result.output.startswith('digraph "vfio_0x3"')
    assert result.output.count(" -> ") == 8
    assert "RUNNING -> STOP;" not in result.output  # P2P devices never see RUNNING -> STOP


def test_bad_flags() -> None:
    for text in ("p2p", "stop_copy,bogus"):
        result = CliRunner().invoke(fsm_command, ["--flags", text])
        assert result.exit_code == 2
