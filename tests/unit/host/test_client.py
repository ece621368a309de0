"""The aiohttp control-API client: typed errors, deadlines, retries of what never
reached the host."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from tests.unit.host.apphost import app_host

from vmferry.errors import ApiError, ConfigError, HostError
from vmferry.host import client as client_mod
from vmferry.host.client import HostClient, error_from_body


def test_error_bodies_old_and_new() -> None:
    e = error_from_body(409, b'{"error": {"kind": "Conflict", "message": "m", "step": "s"}}',
                        "Conflict")
    assert (e.status, e.kind, e.message, e.step) == (409, "Conflict", "m", "s")
    e = error_from_body(400, b'{"error": "plain"}', "Bad Request")
    assert (e.kind, e.message) == ("BadRequest", "plain")
    e = error_from_body(500, b"<html>", "Internal Server Error")
    assert e.message == "Internal Server Error" and e.kind == "InternalError"


def test_unreachable_host_is_retried_then_a_host_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "BACKOFF_S", 0.01)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(HostError, match="cannot reach host"):
            HostClient(f"http://127.0.0.1:{port}", "t" * 32).get("/v1/host")


def test_a_silent_host_times_out() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    held: list[socket.socket] = []

    def accept() -> None:
        for _ in range(3):
            conn, _ = srv.accept()
            held.append(conn)  # never answers

    threading.Thread(target=accept, daemon=True).start()
    with pytest.raises(HostError, match="timed out"):
        HostClient(f"http://127.0.0.1:{port}", "t" * 32, timeout=0.3).post("/v1/vms", {})
    for c in held:
        c.close()
    srv.close()


def test_non_finite_numbers_never_leave_the_client() -> None:
    with pytest.raises(ConfigError, match="JSON compliant"):
        HostClient("http://127.0.0.1:1").post("/v1/vms", {"x": float("nan")})


def test_api_error_keeps_kind_and_step(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as a, pytest.raises(ApiError) as err:
        a.client().get("/v1/vms/none")
    assert err.value.kind == "NotFound" and err.value.status == 404
