"""Every way a migration can fail leaves the source running and intact."""

from __future__ import annotations

import time

import pytest

from tests.integration.conftest import Pair, cli, digest, vm_names, wait_job

pytestmark = pytest.mark.integration


def assert_source_intact(pair: Pair, name: str, before: dict[str, str]) -> None:
    vm = pair.a.get(f"/v1/vms/{name}")
    assert vm["runstate"] == "running"
    assert digest(pair.a, name)["ram"] == before["ram"]
    assert name not in vm_names(pair.b)


@pytest.mark.parametrize(
    ("fault", "step_word", "reason_word"),
    [
        ("setup:cut", "setup", "fault"),
        ("active:cut", "ram pass", "fault"),
        ("device:cut", "switchover", "fault"),
        ("ack:cut", "destination", "fault"),
        ("setup:version", "ram pass 1", "receiving stream: UnsupportedVersion"),
        ("active:corrupt", "ram pass 1", "ChecksumMismatch: RAM_PAGES record checksum mismatch"),
    ],
)
def test_fault_in_each_phase(pair: Pair, fault: str, step_word: str, reason_word: str) -> None:
    name = "f-" + fault.replace(":", "-")
    pair.create(name)  # idle guest: its memory must be bit-for-bit what it was
    before = digest(pair.a, name)
    job = pair.migrate(name, fault=fault)
    assert job["status"] == "failed", job
    assert step_word in job["step"] and reason_word in job["error"], (job["step"], job["error"])
    assert_source_intact(pair, name, before)
    dest_job = [j for j in pair.b.get("/v1/jobs") if j["vm"] == name][-1]
    deadline = time.monotonic() + 5
    while dest_job["status"] not in ("failed",) and time.monotonic() < deadline:
        time.sleep(0.05)
        dest_job = [j for j in pair.b.get("/v1/jobs") if j["vm"] == name][-1]
    assert dest_job["status"] == "failed" and dest_job["error"]


def test_cancel_from_the_cli(pair: Pair) -> None:
    pair.create("slow", memory_mib=64)
    before = digest(pair.a, "slow")
    # 2 MiB/s: 32 s of pre-copy, so that even a slow CLI start (seconds on a loaded
    # machine) cancels a running migration, not a completed one
    job = pair.migrate("slow", wait=False, max_bandwidth_mib=2)
    time.sleep(0.5)
    out = cli("job", "cancel", "--host", pair.a_proc.control_url, job["id"], "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    job = wait_job(pair.a, job["id"])
    assert job["status"] == "cancelled" and "cancelled" in job["error"]
    assert job["step"].startswith("ram pass")
    assert_source_intact(pair, "slow", before)


def test_destination_killed_mid_migration(fresh_pair: Pair) -> None:
    pair = fresh_pair
    pair.create("victim", memory_mib=64)
    before = digest(pair.a, "victim")
    job = pair.migrate("victim", wait=False, max_bandwidth_mib=8)
    while (
        pair.a.get(f"/v1/jobs/{job['id']}")["stats"].get("ram", {}).get("transferred", 0)
        < 1024 * 1024
    ):
        time.sleep(0.05)
    pair.b_proc.kill()
    job = wait_job(pair.a, job["id"])
    assert job["status"] == "failed" and "ram pass" in job["step"]
    assert "connection" in job["error"] or "closed" in job["error"]
    vm = pair.a.get("/v1/vms/victim")
    assert vm["runstate"] == "running" and digest(pair.a, "victim")["ram"] == before["ram"]
    assert pair.b_proc.proc.returncode is not None
