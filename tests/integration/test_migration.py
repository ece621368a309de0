"""Live migration between two real host daemons on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Pair, cli, digest, vm_names, wait_recovered
from vmferry.host.transport import Channel, SocketLink
from vmferry.migration.channel import Connection, Hello, Reject, Role

pytestmark = pytest.mark.integration


def test_live_migration_with_dirtying_guest_is_verified(pair: Pair) -> None:
    pair.create("live", workload={"dirty_rate_mbps": 20, "pattern": "hot"})
    time.sleep(0.3)
    job = pair.migrate("live")
    assert job["status"] == "completed", job
    st = job["stats"]
    assert st["verification"]["verified"] and st["verification"]["ram_equal"]
    assert st["ram"]["total"] == 32 * 1024 * 1024 and st["passes"]
    assert st["downtime"] > 0 and st["total-time"] >= st["downtime"]
    for key in (
        "transferred",
        "remaining",
        "duplicate",
        "normal",
        "normal-bytes",
        "dirty-pages-rate",
        "mbps",
        "dirty-sync-count",
        "pages-per-second",
    ):
        assert key in st["ram"]
    assert pair.a.get("/v1/vms/live")["runstate"] == "migrated"
    assert pair.b.get("/v1/vms/live")["runstate"] == "running"
    dest_jobs = [j for j in pair.b.get("/v1/jobs") if j["vm"] == "live"]
    assert dest_jobs[-1]["status"] == "completed"


def test_paused_vm_arrives_paused(pair: Pair) -> None:
    pair.create("sleepy")
    pair.a.post("/v1/vms/sleepy/pause")
    job = pair.migrate("sleepy", offline=True)
    assert job["status"] == "completed" and job["stats"]["verification"]["verified"]
    assert pair.b.get("/v1/vms/sleepy")["runstate"] == "paused"


def test_cli_migrate_and_job_show(pair: Pair) -> None:
    pair.create("viacli")
    out = cli(
        "migrate",
        "viacli",
        "--from",
        pair.a_proc.control_url,
        "--to",
        pair.b_proc.control_url,
        "--json",
    )
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "completed"
    shown = json.loads(
        cli("job", "show", "--host", pair.a_proc.control_url, job["id"], "--json").stdout
    )
    assert shown["id"] == job["id"] and shown["stats"]["status"] == "completed"


def test_vm_verbs_through_the_cli(pair: Pair, tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('name = "verbs"\nmemory_mib = 16\nvcpus = 1\n')
    url = pair.a_proc.control_url
    assert cli("vm", "create", "--host", url, str(f)).returncode == 0
    listed = json.loads(cli("vm", "list", "--host", url, "--json").stdout)
    assert any(v["name"] == "verbs" and v["runstate"] == "running" for v in listed)
    assert (
        json.loads(cli("vm", "pause", "--host", url, "verbs", "--json").stdout)["runstate"]
        == "paused"
    )
    assert (
        json.loads(cli("vm", "start", "--host", url, "verbs", "--json").stdout)["runstate"]
        == "running"
    )
    shown = json.loads(cli("vm", "show", "--host", url, "verbs", "--digest", "--json").stdout)
    assert len(shown["digests"]["ram"]) == 32
    dup = cli("vm", "create", "--host", url, str(f))
    assert dup.returncode == 1 and "exists" in dup.stderr and "Traceback" not in dup.stderr
    assert cli("vm", "destroy", "--host", url, "verbs").returncode == 0
    missing = cli("vm", "show", "--host", url, "verbs")
    assert missing.returncode == 1 and "no VM named" in missing.stderr


def test_openapi_and_loopback_binding(pair: Pair) -> None:
    doc = pair.a.get("/v1/openapi.json")
    assert doc["openapi"].startswith("3.") and "/v1/vms/{name}/migrate" in doc["paths"]
    assert pair.a_proc.control_url.startswith("http://127.0.0.1:")


def _handshake(address: tuple[str, int], hello: Hello) -> object:
    with socket.create_connection(address, timeout=5) as s:
        ch = Channel(SocketLink(s), Connection(Role.SOURCE))
        ch.send(hello)
        return ch.next_event()


def test_unexpected_connection_is_refused_and_logged(pair: Pair) -> None:
    host, port = pair.b.get("/v1/host")["migration_address"]
    reply = _handshake((host, port), Hello("forged", (1, 0), "running", "X"))
    assert isinstance(reply, Reject) and "token" in reply.status.message
    assert reply.status.step == "handshake"
    events = pair.b.get("/v1/events")
    assert any(e["kind"] == "refused" and "forged" not in e["message"] for e in events)


def test_legacy_json_hello_is_refused_naming_the_protocol(pair: Pair) -> None:
    """A host from before the channel protocol (length-prefixed JSON) is told why."""
    host, port = pair.b.get("/v1/host")["migration_address"]
    with socket.create_connection((host, port), timeout=5) as s:
        body = json.dumps({"type": "hello", "token": "old"}).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        s.recv(1024)
    events = pair.b.get("/v1/events")
    assert any(e["kind"] == "refused" and "earlier JSON control frames" in e["message"]
               for e in events)


def test_token_is_single_use(pair: Pair) -> None:
    inc = pair.b.post(
        "/v1/incoming", {"vm": "ghost", "definition": {"name": "ghost", "memory_mib": 4}}
    )
    host, port = inc["migration_address"]
    replies = [_handshake((host, port), Hello(inc["token"], (9, 0), "running", "X"))
               for _ in range(2)]
    assert isinstance(replies[0], Reject) and isinstance(replies[1], Reject)
    assert "version" in replies[0].status.message
    assert "unknown or expired" in replies[1].status.message


def test_daemon_restart_keeps_vms_and_jobs(tmp_path: Path) -> None:
    from vmferry.host.processes import spawn_host

    h = spawn_host("R", tmp_path / "R")
    try:
        c = h.client()
        c.post("/v1/vms", {"definition": {"name": "keep", "memory_mib": 8}, "start": False})
        c.post("/v1/vms", {"definition": {"name": "run", "memory_mib": 8}, "start": True})
        inc = c.post(
            "/v1/incoming", {"vm": "later", "definition": {"name": "later", "memory_mib": 8}}
        )
    finally:
        h.stop()
    h = spawn_host("R", tmp_path / "R")
    try:
        c = h.client()
        vms = {v["name"]: v for v in wait_recovered(c)}
        # no guest memory survives a restart: rebuilt, paused, and said so
        assert {n: v["runstate"] for n, v in vms.items()} == {"keep": "paused", "run": "paused"}
        assert all(v["memory_lost"] and "did not survive" in v["note"] for v in vms.values())
        job = c.get(f"/v1/jobs/{inc['job']}")
        assert job["status"] == "failed" and "restarted" in job["error"]
    finally:
        h.stop()


def test_demo_json_and_stream_inspect(tmp_path: Path) -> None:
    stream = tmp_path / "demo.vmf"
    out = cli(
        "demo",
        "--memory-mib",
        "64",
        "--dirty-rate-mbps",
        "10",
        "--json",
        "--stream-file",
        str(stream),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["status"] == "completed" and report["verified"] is True
    assert report["iterations"] >= 1 and report["downtime"] > 0
    if report["backend"] == "kvm":  # issue 11 item 7: a real guest moved and ran on
        g = report["guest_progress"]
        assert g["continued"] and g["after_resume"] > g["before_stop"] > 0
    else:
        assert "KVM not usable here" in report["backend_note"]
    assert set(report["ram"]) >= {"transferred", "total", "duplicate", "normal"}
    assert report["ram"]["transferred"] == stream.stat().st_size
    drivers = {d["driver"] for d in report["devices"].values()}
    acc = report["vms"]["demo-acc"]
    assert drivers == {"mlx5", "pds"} and set(acc["devices"]) == {"acc0"} and acc["verified"]
    for device in [*report["devices"].values(), *acc["devices"].values()]:
        assert device["equal"] and device["destination_state"] == "RUNNING", device
    summary = json.loads(cli("stream", "inspect", str(stream), "--json").stdout)
    assert summary["complete"] and summary["vm"]["name"] == "demo-vm"
    assert summary["ram"]["pages_raw"] == report["ram"]["normal"]
    assert summary["ram"]["pages_zero"] == report["ram"]["duplicate"]
    assert len(summary["vcpus"]) == 2
    human = cli("stream", "inspect", str(stream))
    assert human.returncode == 0 and "demo-vm" in human.stdout
    data = bytearray(stream.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.vmf"
    bad.write_bytes(bytes(data))
    broken = cli("stream", "inspect", str(bad))
    assert broken.returncode != 0 and "Traceback" not in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1 and "Checksum" in broken.stderr
    bad.write_bytes(stream.read_bytes()[:1000])
    cut = cli("stream", "inspect", str(bad))
    assert cut.returncode != 0 and "Truncated" in cut.stderr


def test_names_collide_on_destination(pair: Pair) -> None:
    pair.create("twin")
    pair.b.post("/v1/vms", {"definition": {"name": "twin", "memory_mib": 4}})
    with pytest.raises(Exception, match="exists"):
        pair.migrate("twin")
    assert pair.a.get("/v1/vms/twin")["runstate"] == "running"
    assert "twin" in vm_names(pair.a)
    assert digest(pair.a, "twin")


def test_snapshot_save_and_restore(fresh_pair: Pair, tmp_path: Path) -> None:
    pair = fresh_pair
    pair.create("snap", workload={"dirty_rate_mbps": 5})
    url = pair.a_proc.control_url
    file = pair.images / "snap.vmf"
    out = cli("vm", "save", "--host", url, "snap", str(file), "--json")
    assert out.returncode == 0, out.stderr
    assert pair.a.get("/v1/vms/snap")["runstate"] == "running"
    summary = json.loads(cli("stream", "inspect", str(file), "--json").stdout)
    assert summary["complete"] and summary["vm"]["name"] == "snap"
    pair.a.post("/v1/vms/snap/pause")
    saved = digest(pair.a, "snap")
    # the saved RAM is what the VM had when saved; restore it paused on the other host
    restored = cli("vm", "restore", "--host", pair.b_proc.control_url, str(file), "--paused")
    assert restored.returncode == 0, restored.stderr
    assert pair.b.get("/v1/vms/snap")["runstate"] == "paused"
    assert len(digest(pair.b, "snap")["ram"]) == len(saved["ram"])
    dup = cli("vm", "restore", "--host", pair.b_proc.control_url, str(file))
    assert dup.returncode == 1 and "exists" in dup.stderr
    bad = pair.images / "bad.vmf"
    data = bytearray(file.read_bytes())
    data[len(data) // 3] ^= 1
    bad.write_bytes(bytes(data))
    pair.b.delete("/v1/vms/snap")
    broken = cli("vm", "restore", "--host", pair.b_proc.control_url, str(bad))
    assert broken.returncode == 1 and "ChecksumMismatch" in broken.stderr
    assert "snap" not in vm_names(pair.b)


def test_snapshot_of_a_paused_vm_restores_bit_for_bit(fresh_pair: Pair, tmp_path: Path) -> None:
    pair = fresh_pair
    pair.create("still", workload={"dirty_rate_mbps": 5})
    pair.a.post("/v1/vms/still/pause")
    before = digest(pair.a, "still")
    file = pair.images / "still.vmf"
    pair.a.post("/v1/vms/still/save", {"path": str(file)})
    pair.b.post("/v1/restore", {"path": str(file), "start": False})
    assert digest(pair.b, "still") == before
