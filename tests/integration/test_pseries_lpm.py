"""Live Partition Mobility between two host daemons whose platform descriptions differ.

Host A and host B describe different platforms in their ``[lpm]`` tables (NUMA domain,
cache geometry, platform-facility properties).  A pseries VM migrated from A to B gets
B's firmware update sequence before its vCPUs run; the job's destination report lists what
changed; ``vmferry vm dtb`` exports the tree before and after.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libfdt
import pytest

from tests.integration.conftest import cli, wait_job
from vmferry.host.processes import HostProcess, spawn_host
from vmferry.hw.devtree import DeviceTree, load_fdt
from vmferry.hw.spapr.platform import generate_pseries_tree
from vmferry.machine.pseries_dt import tree_differences

PLATFORM_A = """[lpm]
numa_domain = 0
l2_size = 524288
"""
PLATFORM_B = """[lpm]
numa_domain = 2
l2_size = 1048576
l3_size = 20971520
shared_interrupt_pool = 0xFFFFFFF1
max_sync_cop_len = 0x2000
"""


def definition(name: str, **dt: str) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": name,
        "arch": "pseries",
        "memory_mib": 64,
        "vcpus": 2,
        "fill": "random",
        "workload": {"dirty_rate_mbps": 20, "seed": 5},
    }
    if dt:
        d["device_tree"] = dt
    return d


def destination_platform() -> DeviceTree:
    """What B's firmware describes for such a VM (its [lpm] table, 64 MiB LMBs)."""
    return generate_pseries_tree(64, 2, lmb_size=64 << 20, numa_domain=2, l2_size=1 << 20,
                                 l3_size=20 << 20, shared_interrupt_pool=0xFFFFFFF1,
                                 max_sync_cop_len=0x2000)


class Hosts:
    def __init__(self, tmp: Path) -> None:
        self.procs: list[HostProcess] = []
        for name, text in (("A", PLATFORM_A), ("B", PLATFORM_B)):
            path = tmp / f"{name}.toml"
            path.write_text(text)
            self.procs.append(spawn_host(name, tmp / name, extra_args=["--platform", str(path)]))
        self.a = self.procs[0].client()
        self.b = self.procs[1].client()

    def migrate(self, name: str) -> dict[str, Any]:
        job = self.a.post(f"/v1/vms/{name}/migrate",
                          {"destination": self.procs[1].control_url, "params": {"verify": True}})
        return wait_job(self.a, job["id"], timeout=120)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    h = Hosts(tmp_path_factory.mktemp("lpm"))
    try:
        yield h
    finally:
        h.stop()


def dtb(host: HostProcess, name: str, out: Path) -> bytes:
    res = cli("vm", "dtb", name, "--host", host.control_url, "-o", str(out))
    assert res.returncode == 0, res.stderr
    blob = out.read_bytes()
    libfdt.Fdt(blob)  # a valid flattened tree for pylibfdt
    return blob


def test_migration_runs_the_update_before_resume(hosts: Hosts, tmp_path: Path) -> None:
    hosts.a.post("/v1/vms", {"definition": definition("lpm1"), "start": True})
    before = dtb(hosts.procs[0], "lpm1", tmp_path / "before.dtb")
    src_report = hosts.a.get("/v1/vms/lpm1")["report"]["pseries-dt"]
    assert src_report["check"] == "ok" and src_report["platform"]["numa_domain"] == 0

    job = hosts.migrate("lpm1")
    assert job["status"] == "completed", job
    stats = job["stats"]
    assert stats["destination_ok"] is True
    assert "handler:pseries-dt" in stats["verification"]["destination"]  # tree arrived equal
    rep = stats["destination_report"]["pseries-dt"]
    assert rep["ok"], rep
    # applied when the vCPUs were about to start, before any guest time ran on B
    assert rep["applied_at"] == "vm_start" and rep["guest_ran_before_update_s"] == 0.0
    assert rep["source_host"] == "A" and rep["destination_host"] == "B"
    assert rep["trace"][:2] == ["activate-firmware", "cpus_read_lock"]
    assert "update-nodes" in rep["trace"] and "cacheinfo_rebuild" in rep["trace"]
    assert {"/cpus/l2-cache@2000", "/cpus/l3-cache@3000"} <= set(rep["nodes_changed"])
    assert {"/memory@0:ibm,associativity", "/cpus/PowerPC,POWER9@0:ibm,associativity",
            "/ibm,dynamic-reconfiguration-memory:ibm,associativity-lookup-arrays",
            "/rtas:ibm,current-associativity-domains"} <= set(rep["properties_changed"])
    assert "/ibm,platform-facilities" in rep["ignored"]
    assert rep["tree_check"] == "ok" and not rep["hazards"] and not rep["leaks"]
    assert rep["matches_destination"] and rep["exposure_window_s"] == 0.0

    dst = hosts.b.get("/v1/vms/lpm1")["report"]["pseries-dt"]
    assert dst["check"] == "ok" and dst["last_update"]["ok"]
    after = dtb(hosts.procs[1], "lpm1", tmp_path / "after.dtb")
    assert after != before
    want = destination_platform()
    got = load_fdt(after)
    # equal to B's description, except the facilities the seed patch keeps from boot
    assert tree_differences(got, want, keep_facilities=True) == []
    assert tree_differences(got, load_fdt(before), keep_facilities=True)
    assert (got.find_by_path("/ibm,platform-facilities/ibm,random-v1") is not None)


def test_no_pf_skip_hazard_reported_and_vm_kept(hosts: Hosts, tmp_path: Path) -> None:
    hosts.a.post("/v1/vms", {"definition": definition("lpm2", mode="no_pf_skip"),
                             "start": True})
    job = hosts.migrate("lpm2")
    # the update runs after COMMIT: the migration completes, the report says what broke
    assert job["status"] == "completed", job
    assert job["stats"]["destination_ok"] is False
    rep = job["stats"]["destination_report"]["pseries-dt"]
    assert not rep["ok"] and rep["mode"] == "no_pf_skip"
    uaf = [h for h in rep["hazards"] if h["hazard"] == "use-after-free"]
    assert uaf and "ibm,platform-facilities" in uaf[0]["node"]
    assert rep["tree_check"] != "ok" and not rep["matches_destination"]
    assert rep["exposure_window_s"] > 0  # upstream: user space ran against the old tree

    vm = hosts.b.get("/v1/vms/lpm2")  # the daemon is fine, the VM runs on
    assert vm["runstate"] == "running" and vm["report"]["pseries-dt"]["check"] != "ok"
    assert hosts.b.get("/v1/host")["name"] == "B"
    libfdt.Fdt(dtb(hosts.procs[1], "lpm2", tmp_path / "lpm2.dtb"))


def test_dtb_errors(hosts: Hosts) -> None:
    res = cli("vm", "dtb", "nosuchvm", "--host", hosts.procs[0].control_url)
    assert res.returncode != 0 and "nosuchvm" in res.stderr
    hosts.a.post("/v1/vms", {"definition": {"name": "gen", "memory_mib": 16}})
    res = cli("vm", "dtb", "gen", "--host", hosts.procs[0].control_url)
    assert res.returncode != 0 and "no device tree" in res.stderr


def test_snapshot_restored_on_another_platform_is_updated(hosts: Hosts, tmp_path: Path) -> None:
    hosts.b.post("/v1/vms", {"definition": definition("lpm3"), "start": True})
    path = hosts.procs[1].images_dir / "lpm3.vmf"
    hosts.b.post("/v1/vms/lpm3/save", {"path": str(path)})
    hosts.b.delete("/v1/vms/lpm3")
    hosts.a.post("/v1/restore", {"path": str(path), "start": True})
    rep = hosts.a.get("/v1/vms/lpm3")["report"]["pseries-dt"]
    assert rep["check"] == "ok" and rep["platform"]["numa_domain"] == 0
    last = rep["last_update"]
    assert last["ok"] and last["source_host"] == "B" and last["matches_destination"]
    assert "/memory@0:ibm,associativity" in last["properties_changed"]
