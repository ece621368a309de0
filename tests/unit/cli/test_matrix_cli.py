"""``vmferry matrix`` through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vmferry.cli.main import cli

PROFILES = "arm64-linux-4.16,arm64-linux-4.17"


def test_json_output() -> None:
    result = CliRunner().invoke(cli, ["matrix", "--profiles", PROFILES, "--guest-psci",
                                      "default,0.2", "--compat", "qemu", "--json"])
    assert result.exit_code == 0, result.output
    cells = json.loads(result.output)
    assert {c["outcome"] for c in cells} == {"migrates", "fails_after_stop", "degraded"}
    assert {c["compat"] for c in cells} == {"qemu"}


def test_markdown_default_and_preflight() -> None:
    result = CliRunner().invoke(cli, ["matrix", "--profiles", PROFILES])
    assert result.exit_code == 0, result.output
    assert "compat: preflight" in result.output
    assert "fails_after_stop | 0 |" in result.output


def test_html_and_allow_degraded() -> None:
    result = CliRunner().invoke(cli, ["matrix", "--profiles", PROFILES, "--html",
                                      "--allow-degraded", "--mitigations", "avail,not_avail"])
    assert result.exit_code == 0, result.output
    assert '<table class="grid"' in result.output and "degraded" in result.output


def test_unknown_profile_is_an_error() -> None:
    result = CliRunner().invoke(cli, ["matrix", "--profiles", "arm64-linux-1.0"])
    assert result.exit_code != 0
    assert "unknown profile" in str(result.exception)


def test_bad_psci_choice() -> None:
    result = CliRunner().invoke(cli, ["matrix", "--guest-psci", "0.3"])
    assert result.exit_code != 0
