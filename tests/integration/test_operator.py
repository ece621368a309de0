"""Issue 13: a CLI that tells the truth, Ctrl-C, one daemon per state dir, events, metrics
and live parameter changes -- against real host daemons and real CLI subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Pair, cli, vm_names, wait_job
from vmferry.host.events import stream_events
from vmferry.host.processes import spawn_host

pytestmark = pytest.mark.integration

# a CLI child whose Ctrl-C is Python's default, whatever the test runner does with SIGINT
_CLI = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'vmferry'; from vmferry.cli.main import main; main()")


def popen_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CLI, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_until(stream: Any, word: str, timeout: float = 30) -> list[str]:
    lines: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if word in line:
            return lines
    raise AssertionError(f"{word!r} never came: {lines}")


def test_item1_same_host_refused_with_clear_message(pair: Pair) -> None:
    pair.create("selfie")
    url = pair.a_proc.control_url
    res = cli("migrate", "selfie", "--from", url, "--to", url.replace("127.0.0.1", "localhost"))
    assert res.returncode == 1
    assert "source and destination are the same host" in res.stderr
    assert "exists" not in res.stderr
    assert pair.a.get("/v1/vms/selfie")["runstate"] == "running"


def test_item1_migrating_back_replaces_the_leftover(pair: Pair) -> None:
    pair.create("boomerang")
    a, b = pair.a_proc.control_url, pair.b_proc.control_url
    assert cli("migrate", "boomerang", "--from", a, "--to", b).returncode == 0
    assert pair.a.get("/v1/vms/boomerang")["runstate"] == "migrated"
    back = cli("migrate", "boomerang", "--from", b, "--to", a)
    assert back.returncode == 0, back.stdout + back.stderr
    assert pair.a.get("/v1/vms/boomerang")["runstate"] == "running"
    assert pair.b.get("/v1/vms/boomerang")["runstate"] == "migrated"
    # --undefinesource: the source keeps no record at all
    res = cli("migrate", "boomerang", "--from", a, "--to", b, "--undefinesource")
    assert res.returncode == 0, res.stderr
    assert "boomerang" not in vm_names(pair.a)
    assert pair.b.get("/v1/vms/boomerang")["runstate"] == "running"


def test_item1_downtime_over_its_limit_warns(pair: Pair) -> None:
    pair.create("late")
    res = cli("migrate", "late", "--from", pair.a_proc.control_url, "--to",
              pair.b_proc.control_url, "--offline", "--downtime-limit", "0.01")
    assert res.returncode == 0, res.stderr
    assert "warning: downtime" in res.stdout and "exceeded the limit of 0.01 ms" in res.stdout
    job = [j for j in pair.a.get("/v1/jobs") if j["vm"] == "late"][-1]
    assert any("exceeded the limit" in w for w in job["stats"]["warnings"])


def test_item1_destination_problem_exits_nonzero(pair: Pair) -> None:
    pair.a.post("/v1/vms", {"definition": {
        "name": "uaf", "arch": "pseries", "memory_mib": 64, "fill": "random",
        "device_tree": {"mode": "no_pf_skip"}}, "start": True})
    res = cli("migrate", "uaf", "--from", pair.a_proc.control_url, "--to",
              pair.b_proc.control_url)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "destination reported problems" in res.stdout
    assert "problem: pseries-dt" in res.stdout and "leak" in res.stdout
    as_json = cli("job", "watch", "--host", pair.a_proc.control_url, "--json",
                  [j for j in pair.a.get("/v1/jobs") if j["vm"] == "uaf"][-1]["id"])
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["stats"]["destination_ok"] is False


def test_item2_ctrl_c_cancels_migrate_and_reports_where_the_vm_is(pair: Pair) -> None:
    pair.create("interrupted", memory_mib=64)
    proc = popen_cli("migrate", "interrupted", "--from", pair.a_proc.control_url, "--to",
                     pair.b_proc.control_url, "--max-bandwidth", "8")
    assert proc.stdout is not None
    read_until(proc.stdout, "active")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "cancelling job" in err
    assert "stays on the source host" in err and "running" in err
    job = [j for j in pair.a.get("/v1/jobs") if j["vm"] == "interrupted"][-1]
    assert job["status"] == "cancelled"
    assert pair.a.get("/v1/vms/interrupted")["runstate"] == "running"
    assert "interrupted" not in vm_names(pair.b)


def test_item2_second_ctrl_c_detaches_with_the_job_id(pair: Pair) -> None:
    pair.create("detached", memory_mib=64)
    proc = popen_cli("migrate", "detached", "--from", pair.a_proc.control_url, "--to",
                     pair.b_proc.control_url, "--max-bandwidth", "8")
    assert proc.stdout is not None
    lines = read_until(proc.stdout, "active")
    job_id = lines[-1].split()[1].rstrip(":")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert f"detached: job {job_id}" in err and "vmferry job watch" in err
    wait_job(pair.a, job_id)


def test_item2_job_watch_detaches_or_cancels(pair: Pair) -> None:
    pair.create("watched", memory_mib=64)
    job = pair.migrate("watched", wait=False, max_bandwidth_mib=3)
    url = pair.a_proc.control_url
    proc = popen_cli("job", "watch", "--host", url, job["id"])
    assert proc.stdout is not None
    read_until(proc.stdout, "active")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and f"detached: job {job['id']}" in err
    assert pair.a.get(f"/v1/jobs/{job['id']}")["status"] == "active"  # it goes on

    proc = popen_cli("job", "watch", "--host", url, job["id"], "--cancel-on-interrupt")
    assert proc.stdout is not None
    read_until(proc.stdout, "active")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stays on the source host" in err
    assert pair.a.get(f"/v1/jobs/{job['id']}")["status"] == "cancelled"


def test_item3_one_daemon_per_state_dir(pair: Pair) -> None:
    state = pair.a_proc.state_dir
    ready = (state / "ready.json").read_text()
    res = cli("host", "serve", "--name", "again", "--state-dir", str(state))
    assert res.returncode == 1
    assert res.stderr.strip() == (f"vmferry: error: state dir {state} is in use by another "
                                  f"vmferry host daemon (pid {pair.a_proc.proc.pid})")
    assert (state / "ready.json").read_text() == ready  # the first daemon's file survives
    assert pair.a.get("/v1/host")["name"] == "A"


def test_item3_serve_errors_are_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    res = cli("host", "serve", "--name", "x", "--state-dir", str(not_a_dir))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"vmferry: error: state dir {not_a_dir} is not a directory"]
    host = spawn_host("busy", tmp_path / "busy", listen="127.0.0.1:0")
    try:
        port = host.control_url.rsplit(":", 1)[1]
        res = cli("host", "serve", "--name", "y", "--state-dir", str(tmp_path / "y"),
                  "--listen", f"127.0.0.1:{port}")
        assert res.returncode == 1 and "Traceback" not in res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("vmferry: error")]
        assert len(lines) == 1 and "address already in use" in lines[0].lower()
    finally:
        host.stop()


def test_item8_event_stream_follows_a_job(pair: Pair) -> None:
    pair.create("evented")
    job = pair.migrate("evented", wait=False)
    seen: list[dict[str, Any]] = []
    for event in stream_events(pair.a_proc.control_url, token=pair.a.token, job=job["id"]):
        assert event.kind == "job" and event.data["id"] == job["id"]
        seen.append(event.data)
        if event.data["status"] == "completed":
            break
    assert seen[-1]["status"] == "completed" and seen[-1]["stats"]["passes"]
    # the CLI command, on the VM's events, after the fact: its current state first
    res = cli("events", "--host", pair.b_proc.control_url, "--vm", "evented", "--count", "1")
    assert res.returncode == 0 and "vm evented: running" in res.stdout


def test_item8_metrics(pair: Pair) -> None:
    pair.create("metered")
    job = pair.migrate("metered")
    text = pair.a.request_bytes("GET", "/metrics").decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vmferry_vm_runstate", "vmferry_migration_transferred_bytes",
                 "vmferry_migration_passes", "vmferry_migration_downtime_seconds",
                 "vmferry_migration_dirty_pages_rate", "vmferry_migration_throttle_ratio",
                 "vmferry_refused_connections"):
        assert name in fams, sorted(fams)

    def value(fam: str, **labels: str) -> float:
        for s in fams[fam].samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        raise AssertionError((fam, labels))

    assert value("vmferry_vm_runstate", vm="metered", runstate="migrated") == 1.0
    assert value("vmferry_vm_runstate", vm="metered", runstate="running") == 0.0
    assert value("vmferry_migration_transferred_bytes", job=job["id"]) == (
        job["stats"]["ram"]["transferred"])
    assert value("vmferry_migration_passes", job=job["id"]) == len(job["stats"]["passes"])
    before = value("vmferry_refused_connections")
    import socket
    host, port = pair.b.get("/v1/host")["migration_address"]
    with socket.create_connection((host, port)) as s:
        s.sendall(b"\x00" * 64)
        s.settimeout(5)
        s.recv(4096)
    text = pair.b.request_bytes("GET", "/metrics").decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert value("vmferry_refused_connections") >= before + 1


def test_item7_job_set_changes_a_running_migration(pair: Pair) -> None:
    pair.create("tuned", memory_mib=64)
    job = pair.migrate("tuned", wait=False, max_bandwidth_mib=4, downtime_limit_ms=300)
    url = pair.a_proc.control_url
    res = cli("job", "set", "--host", url, job["id"], "--downtime-limit", "250",
              "--max-bandwidth", "0")
    assert res.returncode == 0, res.stderr
    assert "250 ms" in res.stdout and "unlimited" in res.stdout
    done = wait_job(pair.a, job["id"])
    assert done["status"] == "completed"
    assert done["params"]["downtime_limit_ms"] == 250
    assert done["params"]["max_bandwidth_mib"] is None
    assert done["stats"]["passes"][-1]["downtime_limit_ms"] == 250
    # 64 MiB at 4 MiB/s would take 16 s: the cap was lifted while pass 1 ran
    assert done["stats"]["passes"][0]["mbps"] > 4 * 8.4
    bad = cli("job", "set", "--host", url, job["id"], "--downtime-limit", "5")
    assert bad.returncode == 1 and "status completed" in bad.stderr


