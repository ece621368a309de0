"""CLI output escapes peer-supplied text: rich markup in names and errors prints as it is
(issue 10, Why 16)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from tests.unit.host.apphost import TOKEN, app_host

from vmferry.cli.main import cli
from vmferry.cli.progress import print_summary as summary

MARKUP = "[/x] [bold]oops[/bold] [/]"


def test_issue10_16_cli_escapes_peer_supplied_markup(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as a:
        job = a.daemon.new_job("vm1", "source", MARKUP, {})
        job.move("failed", MARKUP, f"destination said {MARKUP}")
        a.daemon.save_job(job)
        env = {"VMFERRY_TOKEN": TOKEN, "VMFERRY_TOKEN_FILE": None, "COLUMNS": "300"}
        for args in (["job", "show", "--host", a.url], ["job", "show", "--host", a.url, job.id],
                     ["job", "watch", "--host", a.url, job.id]):
            result = CliRunner().invoke(cli, args, env=env)
            assert result.exception is None or isinstance(result.exception, SystemExit), args
            assert MARKUP in result.output, (args, result.output)


def test_summary_prints_markup_literally(capsys: object) -> None:
    from vmferry.cli.common import console

    with console.capture() as cap:
        summary({"status": "failed", "step": MARKUP, "error": MARKUP})
        summary({"status": "completed", "stats": {"warnings": [MARKUP]}})
    assert cap.get().count(MARKUP) == 3
