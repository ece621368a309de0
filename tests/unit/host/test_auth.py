"""The control API's bearer token (issue 10, Why 5) and its JSON errors (issue 13)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.unit.host.apphost import TOKEN, app_host

from vmferry.cli.main import cli, error_json
from vmferry.errors import ApiError, ConfigError
from vmferry.host.auth import bearer_matches, load_or_create_token, read_token_file
from vmferry.host.serve import run_daemon


def test_issue10_5_control_api_requires_token(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as host:
        for token in (None, "wrong-" * 6):
            for method, path in (("GET", "/v1/vms"), ("POST", "/v1/vms"),
                                 ("GET", "/v1/nowhere"), ("DELETE", "/v1/vms/x")):
                with pytest.raises(ApiError) as err:
                    host.client(token).request(method, path, {} if method == "POST" else None)
                assert err.value.status == 401 and err.value.kind == "Unauthorized"
        assert host.client().get("/v1/vms") == []
        refused = [e for e in host.daemon.store.events() if e["kind"] == "unauthorized"]
        assert refused and "no token" in refused[-1]["message"]
        assert any("wrong token" in e["message"] for e in refused)


def test_issue10_5_non_loopback_listen_requires_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token-file"):
        run_daemon("h", tmp_path / "h", ("0.0.0.0", 0))
    assert not (tmp_path / "h").exists()
    out = CliRunner().invoke(cli, ["host", "serve", "--name", "h", "--listen", "0.0.0.0:0",
                                   "--state-dir", str(tmp_path / "h")])
    assert isinstance(out.exception, ConfigError)


def test_token_file_is_created_private_and_refused_when_readable(tmp_path: Path) -> None:
    path = tmp_path / "token"
    token = load_or_create_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 32
    assert load_or_create_token(path) == token == read_token_file(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="read by others"):
        read_token_file(path)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="cannot open"):
        read_token_file(link)
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="printable") as err:
        read_token_file(short)
    assert "abc" not in str(err.value)


def test_bearer_matches() -> None:
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN)
    assert bearer_matches(f"bearer {TOKEN}", TOKEN)
    assert not bearer_matches(None, TOKEN)
    assert not bearer_matches(f"Basic {TOKEN}", TOKEN)
    assert not bearer_matches(f"Bearer {TOKEN}x", TOKEN)
    assert not bearer_matches("Bearer ü", TOKEN)


def test_cli_takes_the_token_from_env_or_file(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as host:
        runner = CliRunner()
        args = ["vm", "list", "--host", host.url, "--json"]
        ok = runner.invoke(cli, args, env={"VMFERRY_TOKEN": TOKEN, "VMFERRY_TOKEN_FILE": None})
        assert ok.exit_code == 0 and json.loads(ok.output) == []
        token_file = tmp_path / "tok"
        token_file.write_text(TOKEN + "\n")
        os.chmod(token_file, 0o600)
        ok = runner.invoke(cli, ["--token-file", str(token_file), *args],
                           env={"VMFERRY_TOKEN": None, "VMFERRY_TOKEN_FILE": None})
        assert ok.exit_code == 0, ok.output
        bad = runner.invoke(cli, args, env={"VMFERRY_TOKEN": None, "VMFERRY_TOKEN_FILE": None})
        assert isinstance(bad.exception, ApiError) and bad.exception.status == 401


def test_errors_are_json_with_kind_message_step(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as host:
        c = host.client()
        for path, status, kind in (("/v1/vms/ghost", 404, "NotFound"),
                                   ("/v1/jobs/none", 404, "NotFound"),
                                   ("/v1/no/such/route", 404, "NotFound")):
            with pytest.raises(ApiError) as err:
                c.get(path)
            assert (err.value.status, err.value.kind) == (status, kind)
            assert err.value.message
        with pytest.raises(ApiError) as err:
            c.post("/v1/vms/ghost/migrate", {"destination": "http://127.0.0.1:1"})
        assert err.value.status == 404
        out = error_json(err.value)
        assert out["error"] == {"kind": "NotFound", "message": err.value.message, "step": ""}


def test_unreachable_peer_is_502(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as host:
        c = host.client()
        c.post("/v1/vms", {"definition": {"name": "v", "memory_mib": 4}})
        with pytest.raises(ApiError) as err:
            c.post("/v1/vms/v/migrate", {"destination": "http://127.0.0.1:1"})
        assert err.value.status == 502 and err.value.kind == "PeerUnreachable"
        assert err.value.step == "setup"
        assert c.get("/v1/vms/v")["runstate"] == "paused" and c.get("/v1/jobs") == []


def test_issue13_4_cli_json_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from vmferry.cli.main import main

    with app_host(tmp_path / "A") as host:
        monkeypatch.setenv("VMFERRY_TOKEN", TOKEN)
        monkeypatch.setattr("sys.argv", ["vmferry", "vm", "show", "--host", host.url, "ghost",
                                         "--json"])
        with pytest.raises(SystemExit) as code:
            main()
        assert code.value.code == 1
        out = json.loads(capsys.readouterr().out)
        assert out["status"] == 404 and out["error"]["kind"] == "NotFound"
        assert "ghost" in out["error"]["message"]
