"""Issue 11 items 3-6 through two host daemons: real KVM guests created, shown, migrated,
refused at pre-flight, and kept safe when a migration fails."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmferry.host.client import HostClient
from vmferry.host.demo import choose_backend
from vmferry.host.processes import HostProcess, spawn_host

from ..integration.conftest import wait_job

pytestmark = [pytest.mark.kvm, pytest.mark.integration]


class Hosts:
    def __init__(self, a: HostProcess, b: HostProcess) -> None:
        self.a_proc, self.b_proc = a, b
        self.a, self.b = a.client(), b.client()

    def create(self, name: str, **kw: Any) -> dict[str, Any]:
        definition = {"name": name, "arch": "x86_64", "memory_mib": 32, "vcpus": 2,
                      "fill": "random",
                      "workload": {"dirty_rate_mbps": 20, "pattern": "hot"}, **kw}
        out: dict[str, Any] = self.a.post("/v1/vms", {"definition": definition,
                                                       "start": True})
        return out

    def migrate(self, name: str, wait: bool = True, **params: Any) -> dict[str, Any]:
        job: dict[str, Any] = self.a.post(
            f"/v1/vms/{name}/migrate",
            {"destination": self.b_proc.control_url, "params": {"verify": True, **params}})
        return wait_job(self.a, job["id"]) if wait else job


def progress(c: HostClient, name: str) -> int:
    return int(c.get(f"/v1/vms/{name}")["guest"]["progress"])


def advancing(c: HostClient, name: str, timeout: float = 10) -> int:
    first = progress(c, name)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        now = progress(c, name)
        if now > first:
            return now
        time.sleep(0.05)
    raise AssertionError(f"{name}: guest progress stuck at {first}")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    root = tmp_path_factory.mktemp("kvmhosts")
    a, b = spawn_host("A", root / "A"), spawn_host("B", root / "B")
    try:
        yield Hosts(a, b)
    finally:
        a.stop()
        b.stop()


def test_item3_vm_show_reports_kvm_backend_and_guest(hosts: Hosts) -> None:
    info = hosts.a.get("/v1/host")
    assert info["kvm"]["usable"] is True and info["kvm"]["reason"]
    hosts.create("show1", vcpus=1)
    try:
        shown = hosts.a.get("/v1/vms/show1")
        assert shown["backend"] == "kvm"
        advancing(hosts.a, "show1")
        time.sleep(1.2)
        guest = hosts.a.get("/v1/vms/show1")["guest"]
        assert guest["exits"] > 0 and guest["exits_per_s"] > 0
        assert guest["dirty_log"] == "KVM_GET_DIRTY_LOG"
    finally:
        hosts.a.delete("/v1/vms/show1")


@pytest.mark.parametrize(("mode", "said"), [
    ("get", "KVM_GET_DIRTY_LOG"),
    ("ring", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL (per-vCPU rings)"),
])
def test_item4_live_migration_between_daemons(hosts: Hosts, mode: str, said: str) -> None:
    name = f"mig-{mode}"
    hosts.create(name, dirty_log=mode)
    advancing(hosts.a, name)
    job = hosts.migrate(name, downtime_limit_ms=100)
    assert job["status"] == "completed", job
    st = job["stats"]
    assert st["verification"]["verified"] is True
    # the job says which dirty tracking the passes used
    assert st["ram"]["dirty-tracking"] == said
    assert st["source_report"]["x86-cpu"]["dirty_log"] == said
    assert any("MSR_KVM_POLL_CONTROL" in w for w in st["warnings"])
    assert "MSR 0x4b564d06 (MSR_KVM_POLL_CONTROL)" in st["source_report"]["x86-cpu"]["dropped"]
    shown = hosts.b.get(f"/v1/vms/{name}")
    assert shown["backend"] == "kvm" and shown["runstate"] == "running"
    assert shown["guest"]["dirty_log"] == said
    advancing(hosts.b, name)
    hosts.b.delete(f"/v1/vms/{name}")


def test_item6_cancel_leaves_source_running(hosts: Hosts) -> None:
    hosts.create("can1", memory_mib=256, workload={"dirty_rate_mbps": 40,
                                                   "pattern": "uniform"})
    try:
        job = hosts.migrate("can1", wait=False, max_bandwidth_mib=20)
        time.sleep(0.5)
        hosts.a.post(f"/v1/jobs/{job['id']}/cancel", {})
        done = wait_job(hosts.a, job["id"])
        assert done["status"] == "cancelled", done
        assert hosts.a.get("/v1/vms/can1")["runstate"] == "running"
        advancing(hosts.a, "can1")
        assert "can1" not in [v["name"] for v in hosts.b.get("/v1/vms")]
    finally:
        hosts.a.delete("/v1/vms/can1")


def test_item5_refused_by_destination_platform(tmp_path: Path) -> None:
    platform = tmp_path / "b.toml"
    platform.write_text('[kvm]\nhide_cpuid = ["1:edx:26"]\nrefuse_msrs = [0x277]\n')
    a = spawn_host("A", tmp_path / "A")
    b = spawn_host("B", tmp_path / "B", extra_args=["--platform", str(platform)])
    try:
        h = Hosts(a, b)
        h.create("ref1", vcpus=1)
        before = advancing(h.a, "ref1")
        job = h.migrate("ref1")
        assert job["status"] == "failed" and job["step"] == "pre-flight", job
        assert "IA32_PAT" in job["error"] and "CPUID 0x1 edx bit 26 (sse2)" in job["error"]
        assert h.a.get("/v1/vms/ref1")["runstate"] == "running"
        assert advancing(h.a, "ref1") > before
        assert h.b.get("/v1/vms") == []
    finally:
        a.stop()
        b.stop()


def test_item6_destination_killed_mid_stream(tmp_path: Path) -> None:
    a = spawn_host("A", tmp_path / "A")
    b = spawn_host("B", tmp_path / "B")
    try:
        h = Hosts(a, b)
        h.create("kill1", memory_mib=512, workload={"dirty_rate_mbps": 30,
                                                    "pattern": "uniform"})
        advancing(h.a, "kill1")
        job = h.migrate("kill1", wait=False, max_bandwidth_mib=50)
        time.sleep(1.0)
        b.kill()
        done = wait_job(h.a, job["id"])
        assert done["status"] == "failed", done
        assert h.a.get("/v1/vms/kill1")["runstate"] == "running"
        advancing(h.a, "kill1")
    finally:
        a.stop()
        b.stop()


def test_item4_vm_save_and_restore(hosts: Hosts) -> None:
    hosts.create("snap1", vcpus=1)
    before = advancing(hosts.a, "snap1")
    path = hosts.a_proc.images_dir / "snap1.vmferry"  # both hosts share it
    hosts.a.post("/v1/vms/snap1/save", {"path": str(path)})
    assert advancing(hosts.a, "snap1") > before  # the saved VM runs on
    hosts.a.delete("/v1/vms/snap1")
    hosts.b.post("/v1/restore", {"path": str(path)})
    restored = hosts.b.get("/v1/vms/snap1")
    assert restored["backend"] == "kvm"
    at_restore = restored["guest"]["progress"]
    assert at_restore >= before
    advancing(hosts.b, "snap1")
    hosts.b.delete("/v1/vms/snap1")


@pytest.mark.parametrize("phase", ["setup", "active", "device", "ack"])
def test_item6_channel_cut_in_any_phase(hosts: Hosts, phase: str) -> None:
    name = f"cut-{phase}"
    hosts.create(name, vcpus=1)
    try:
        before = advancing(hosts.a, name)
        job = hosts.migrate(name, fault=f"{phase}:cut")
        assert job["status"] == "failed", job
        assert hosts.a.get(f"/v1/vms/{name}")["runstate"] == "running"
        assert advancing(hosts.a, name) > before
        time.sleep(0.2)
        assert name not in [v["name"] for v in hosts.b.get("/v1/vms")]
    finally:
        hosts.a.delete(f"/v1/vms/{name}")


def test_item7_demo_backend_choice() -> None:
    assert choose_backend("model") == ("model", "simulated guest (as asked)")
    backend, note = choose_backend("auto")
    assert backend == "kvm" and note.startswith("real x86_64 guest on KVM")
