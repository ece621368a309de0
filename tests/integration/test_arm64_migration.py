"""arm64 guests between host daemons started with different kernel profiles.

One migration per matrix outcome (migrates, refused, fails_after_stop, degraded).  Each
test computes the same cell with ``vmferry matrix``'s code (:func:`run_cell`) and checks
that the real migration between two daemons ends the way the matrix predicts: the outcome,
whether the source still runs the guest, and the guest's mitigation status afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import cli, digest, wait_job
from vmferry.analysis.matrix import Cell, CellSpec, run_cell
from vmferry.errors import ApiError
from vmferry.host.client import HostClient
from vmferry.host.processes import HostProcess, spawn_host

pytestmark = pytest.mark.integration

OLD, NEW, BITMAPS, WA_REGS = (
    "arm64-linux-4.16", "arm64-linux-4.17", "arm64-linux-5.19", "arm64-linux-5.3")


@dataclass
class Host:
    proc: HostProcess
    client: HostClient
    profile: str
    mitigation: str


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Host]]:
    """Four hosts: an old (4.16) and a new (4.17) kernel, a 5.19 one, and a 5.3 one whose
    CPUs have no Spectre-v2/BHB mitigation."""
    root = tmp_path_factory.mktemp("arm64-hosts")
    wanted = {"old": (OLD, "avail"), "new": (NEW, "avail"), "bitmaps": (BITMAPS, "avail"),
              "unmitigated": (WA_REGS, "not_avail")}
    out: dict[str, Host] = {}
    try:
        for key, (profile, mitigation) in wanted.items():
            proc = spawn_host(key, root / key,
                              extra_args=["--profile", profile, "--mitigation", mitigation])
            out[key] = Host(proc, proc.client(), profile, mitigation)
        yield out
    finally:
        for host in out.values():
            host.proc.stop()


def create(host: Host, name: str, psci: str = "default") -> dict[str, Any]:
    definition = {"name": name, "arch": "arm64", "memory_mib": 16, "vcpus": 2,
                  "fill": "random", "psci": psci}
    out: dict[str, Any] = host.client.post("/v1/vms", {"definition": definition, "start": True})
    return out


def migrate(src: Host, dst: Host, name: str, **params: Any) -> dict[str, Any]:
    job = src.client.post(f"/v1/vms/{name}/migrate",
                          {"destination": dst.proc.control_url,
                           "params": {"verify": True, **params}})
    return wait_job(src.client, job["id"])


def predicted(src: Host, dst: Host, compat: str, allow_degraded: bool = False,
              psci: str = "default") -> Cell:
    cell = run_cell(CellSpec(src.profile, dst.profile, psci, src.mitigation, dst.mitigation,
                             compat, allow_degraded))
    assert cell is not None
    return cell


def guest(host: Host, name: str) -> dict[str, Any]:
    vm = host.client.get(f"/v1/vms/{name}")
    out: dict[str, Any] = vm["report"]["arm64"]["guest"]
    return out


def wait_destination_job(host: Host, name: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        jobs = [j for j in host.client.get("/v1/jobs") if j["vm"] == name]
        if jobs and jobs[-1]["status"] == status:
            return dict(jobs[-1])
        assert time.monotonic() < deadline, jobs
        time.sleep(0.05)


def snapshot(host: Host, name: str) -> dict[str, Any]:
    """The guest's firmware view and its memory digest (an idle guest: memory is fixed)."""
    return {"guest": guest(host, name), "ram": digest(host.client, name)["ram"]}


def assert_source_kept(src: Host, dst: Host, name: str, before: dict[str, Any]) -> None:
    vm = src.client.get(f"/v1/vms/{name}")
    assert vm["runstate"] == "running"
    assert snapshot(src, name) == before  # same boot view and protection, same memory
    assert name not in [v["name"] for v in dst.client.get("/v1/vms")]


def test_hosts_report_their_profile(hosts: dict[str, Host]) -> None:
    info = hosts["unmitigated"].client.get("/v1/host")
    assert (info["profile"], info["kernel"], info["mitigation"]) == (WA_REGS, "5.3",
                                                                     "not_avail")
    assert hosts["old"].client.get("/v1/host")["profile"] == OLD


def test_migrates_old_to_new_with_a_silent_psci_upgrade(hosts: dict[str, Host]) -> None:
    src, dst = hosts["old"], hosts["bitmaps"]
    cell = predicted(src, dst, "preflight")
    assert cell.outcome == "migrates"
    create(src, "up")
    before = guest(src, "up")
    assert before["booted"] and before["psci_version"] == "1.0"
    job = migrate(src, dst, "up")
    assert job["status"] == "completed", job
    assert job["stats"]["verification"]["verified"]  # includes the guest's boot view
    report = job["stats"]["destination_report"]["arm64"]
    assert report["guest"]["mitigation"] == cell.guest_after
    assert report["firmware"]["psci_version"] == cell.psci_after == "1.1"
    assert any("upgrade 1.0 -> 1.1" in w for w in job["stats"]["warnings"])
    after = guest(dst, "up")
    assert after["mitigation"] == cell.guest_after and after["lost"] == []
    assert after["decisions"] == before["decisions"]  # never probed again
    assert src.client.get("/v1/vms/up")["runstate"] == "migrated"


def test_refused_new_to_old_before_anything_moves(hosts: dict[str, Host]) -> None:
    src, dst = hosts["new"], hosts["old"]
    cell = predicted(src, dst, "preflight")
    assert cell.outcome == "refused" and cell.source_running
    create(src, "down")
    before = snapshot(src, "down")
    job = migrate(src, dst, "down")
    assert job["status"] == "failed" and job["step"] == "pre-flight", job
    assert cell.register == "PSCI_VERSION" and "PSCI_VERSION = 0x10000" in job["error"]
    assert job["stats"]["ram"]["transferred"] == 0
    assert_source_kept(src, dst, "down", before)
    assert guest(src, "down")["mitigation"] == cell.guest_before
    wait_destination_job(dst, "down", "failed")


def test_qemu_mode_fails_after_stop_and_the_source_resumes(hosts: dict[str, Host]) -> None:
    src, dst = hosts["new"], hosts["old"]
    cell = predicted(src, dst, "qemu")
    assert cell.outcome == "fails_after_stop" and cell.source_running
    create(src, "down-qemu")
    before = snapshot(src, "down-qemu")
    job = migrate(src, dst, "down-qemu", compat="qemu")
    assert job["status"] == "failed", job
    assert job["stats"]["ram"]["transferred"] > 16 * 1024 * 1024  # RAM moved, guest stopped
    assert cell.step in job["error"] and cell.register in job["error"]  # type: ignore[operator]
    assert_source_kept(src, dst, "down-qemu", before)
    assert guest(src, "down-qemu")["mitigation"] == cell.guest_before
    dest_job = wait_destination_job(dst, "down-qemu", "failed")
    assert dest_job["step"] == "load" and "CpuLoadError" in dest_job["error"]


def test_degraded_only_when_allowed_and_announced(hosts: dict[str, Host]) -> None:
    src, dst = hosts["old"], hosts["unmitigated"]
    refused = predicted(src, dst, "preflight")
    assert refused.outcome == "refused" and refused.lost == ("wa1",)
    cell = predicted(src, dst, "preflight", allow_degraded=True)
    assert cell.outcome == "degraded" and cell.lost == ("wa1",)
    create(src, "lossy")
    before = snapshot(src, "lossy")
    job = migrate(src, dst, "lossy")
    assert job["status"] == "failed" and job["step"] == "pre-flight", job
    assert "Spectre-v2" in job["error"] and "--allow-degraded" in job["error"]
    assert_source_kept(src, dst, "lossy", before)
    wait_destination_job(dst, "lossy", "failed")
    out = cli("migrate", "lossy", "--from", src.proc.control_url, "--to", dst.proc.control_url,
              "--allow-degraded", "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "completed", job
    assert any("degraded" in w and "Spectre-v2" in w for w in job["stats"]["warnings"])
    report = job["stats"]["destination_report"]["arm64"]["guest"]
    assert report["mitigation"] == cell.guest_after and report["mitigation"]["wa1"] == "vulnerable"
    assert tuple(report["lost"]) == cell.lost
    assert guest(dst, "lossy")["mitigation"] == cell.guest_after


def test_qemu_mode_degrades_silently(hosts: dict[str, Host]) -> None:
    src, dst = hosts["old"], hosts["unmitigated"]
    cell = predicted(src, dst, "qemu")
    assert cell.outcome == "degraded"
    create(src, "silent")
    out = cli("migrate", "silent", "--from", src.proc.control_url, "--to",
              dst.proc.control_url, "--compat", "qemu", "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "completed" and job["stats"]["warnings"] == [], job
    after = guest(dst, "silent")
    assert after["mitigation"] == cell.guest_after and tuple(after["lost"]) == cell.lost


def test_pinned_0_2_guest_moves_between_new_kernels(hosts: dict[str, Host]) -> None:
    src, dst = hosts["new"], hosts["bitmaps"]
    cell = predicted(src, dst, "preflight", psci="0.2")
    assert cell.outcome == "migrates" and cell.psci_after == "0.2"
    create(src, "pinned", psci="0.2")
    assert guest(src, "pinned")["psci_version"] == "0.2"
    job = migrate(src, dst, "pinned")
    assert job["status"] == "completed", job
    vm = dst.client.get("/v1/vms/pinned")["report"]["arm64"]
    assert vm["firmware"]["psci_version"] == "0.2" and vm["guest"]["mitigation"] == cell.guest_after


def test_snapshot_restores_the_guest_view_or_refuses(hosts: dict[str, Host],
                                                     tmp_path: Path) -> None:
    src = hosts["new"]
    create(src, "snap")
    before = guest(src, "snap")
    file = src.proc.images_dir / "snap.vmf"
    src.client.post("/v1/vms/snap/save", {"path": str(file)})
    with pytest.raises(ApiError, match=r"CpuLoadError: post_load merge: .* unknown to the dest"):
        hosts["old"].client.post("/v1/restore", {"path": str(file)})
    assert "snap" not in [v["name"] for v in hosts["old"].client.get("/v1/vms")]
    hosts["bitmaps"].client.post("/v1/restore", {"path": str(file)})
    after = guest(hosts["bitmaps"], "snap")
    assert after["decisions"] == before["decisions"] and after["psci_version"] == "1.0"
    fw = hosts["bitmaps"].client.get("/v1/vms/snap")["report"]["arm64"]["firmware"]
    assert fw["psci_version"] == "1.0"  # the stream's version, not 5.19's default 1.1
