"""pseries live migration between two host daemons with DMA mappings live during pre-copy.

Each daemon derives its own gpa -> hpa map (from its name, or its ``--platform`` file), so
the destination really rebuilds its hardware TCE tables with different host addresses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import wait_job
from vmferry.host.client import HostClient
from vmferry.host.processes import HostProcess, spawn_host

LIOBN = 0x80000000
DDW = 0x80000001


def definition(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "arch": "pseries",
        "memory_mib": 64,
        "vcpus": 2,
        "fill": "random",
        "workload": {"dirty_rate_mbps": 40, "seed": 7},
        "tce_windows": [{"liobn": LIOBN, "offset": 0, "size_mib": 256, "page_shift": 16}],
        "dma_devices": [{"name": "nic0", "liobn": LIOBN, "buffers": 8, "rate_mbps": 8}],
        **extra,
    }


def poll(what: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Wait until ``what()`` is truthy (robust on a loaded machine: no tight timing)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def report(c: HostClient, name: str) -> dict[str, Any]:
    out: dict[str, Any] = c.get(f"/v1/vms/{name}")["report"]
    return out


class Hosts:
    def __init__(self, tmp: Path, platform_a: str = "", platform_b: str = "") -> None:
        self.procs: list[HostProcess] = []
        for name, text in (("A", platform_a), ("B", platform_b)):
            args = []
            if text:
                path = tmp / f"{name}.toml"
                path.write_text(text)
                args = ["--platform", str(path)]
            self.procs.append(spawn_host(name, tmp / name, extra_args=args))
        self.a = self.procs[0].client()
        self.b = self.procs[1].client()

    def migrate(self, name: str) -> dict[str, Any]:
        job = self.a.post(
            f"/v1/vms/{name}/migrate",
            {"destination": self.procs[1].control_url, "params": {"verify": True}},
        )
        return wait_job(self.a, job["id"], timeout=120)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(tmp_path)
    try:
        yield h
    finally:
        h.stop()


def test_pseries_migration_with_live_dma_mappings(hosts: Hosts) -> None:
    hosts.a.post("/v1/vms", {"definition": definition("ppc1"), "start": True})
    poll(lambda: report(hosts.a, "ppc1")["spapr-dma:nic0"].get("driver", {}).get("received"))
    before = report(hosts.a, "ppc1")
    assert before["spapr-tce"]["windows"][0]["mapped"] == 9  # ring + 8 posted buffers
    hpa_a = before["spapr-tce"]["host"]["hpa_base"]

    job = hosts.migrate("ppc1")
    assert job["status"] == "completed", job
    stats = job["stats"]
    assert stats["passes"] and stats["passes"][0]["pages"] > 0
    check = stats["verification"]
    # RAM digest matched at switchover, and so did the TCE guest view, where every
    # hardware entry reaches in guest memory, and the device's registers
    assert check["ram_equal"] and check["verified"], check
    assert {"handler:spapr-tce", "handler:spapr-dma:nic0"} <= set(check["destination"])
    rebuilt = stats["destination_report"]["spapr-tce"]
    assert rebuilt["rebuild"]["cleared"] == 0 and rebuilt["rebuild"]["mapped"] == 9
    assert rebuilt["invariants"] == "ok"

    after = report(hosts.b, "ppc1")
    assert after["spapr-tce"]["host"]["hpa_base"] != hpa_a  # really another host's map
    migrated = after["spapr-dma:nic0"]["dma_count"]
    assert migrated > before["spapr-dma:nic0"]["dma_count"]  # DMA went on during pre-copy

    def progressed() -> dict[str, Any] | None:
        r = report(hosts.b, "ppc1")
        nic = r["spapr-dma:nic0"]
        return r if nic.get("driver", {}).get("received", 0) > migrated + 10 else None

    now = poll(progressed)
    nic = now["spapr-dma:nic0"]
    # device DMA after migration reached the guest pages the guest expects
    assert nic["faults"] == 0 and not nic["halted"] and not nic["driver_error"]
    assert nic["driver"]["corrupt"] == 0
    hosts.b.post("/v1/vms/ppc1/pause", {})
    assert report(hosts.b, "ppc1")["spapr-tce"]["invariants"] == "ok"


HUGE = "[spapr]\niommu_page_shift = 24\nbacking_shift = 24\n"
SPLIT = """[spapr]
iommu_page_shift = 24
memslots = [{size_mib = 32, backing_shift = 24}, {size_mib = 32, backing_shift = 16}]
"""


def test_destination_clears_entries_its_memory_map_cannot_back(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path, HUGE, SPLIT)
    try:
        d = definition(
            "ppc2",
            tce_windows=[
                {"liobn": LIOBN, "offset": 0, "size_mib": 256, "page_shift": 16},
                {"liobn": DDW, "offset": 1 << 40, "size_mib": 1024, "page_shift": 24},
            ],
            dma_devices=[
                {"name": "nic0", "liobn": LIOBN, "buffers": 4, "rate_mbps": 8},
                {"name": "nic1", "liobn": DDW, "buffers": 4, "rate_mbps": 8},
            ],
        )
        hosts.a.post("/v1/vms", {"definition": d, "start": True})
        poll(lambda: report(hosts.a, "ppc2")["spapr-dma:nic1"].get("driver", {}).get("received"))

        job = hosts.migrate("ppc2")
        assert job["status"] == "completed", job
        stats = job["stats"]
        assert any("cannot back 5 mapped TCE entries" in w for w in stats["warnings"])
        assert stats["verification"]["ram_equal"]
        rebuild = stats["destination_report"]["spapr-tce"]["rebuild"]
        windows = {w["liobn"]: w for w in rebuild["windows"]}
        assert windows[LIOBN]["cleared"] == 0 and windows[LIOBN]["mapped"] == 5
        assert windows[DDW]["cleared"] == 5 and windows[DDW]["mapped"] == 0
        assert rebuild["cleared"] == 5

        def halted() -> dict[str, Any] | None:
            r = report(hosts.b, "ppc2")
            return r if r["spapr-dma:nic1"]["halted"] else None

        r = poll(halted)
        assert r["spapr-dma:nic1"]["faults"] == 1 and "unmapped" in r["spapr-dma:nic1"]["halted"]
        assert r["spapr-tce"]["dma_faults"] >= 1
        assert r["spapr-dma:nic0"]["faults"] == 0
        assert r["spapr-dma:nic0"]["driver"]["corrupt"] == 0
        hosts.b.post("/v1/vms/ppc2/pause", {})
        assert report(hosts.b, "ppc2")["spapr-tce"]["invariants"] == "ok"
    finally:
        hosts.stop()


def test_pseries_vm_with_a_vfio_device_dmaing_through_the_tce_tables(hosts: Hosts) -> None:
    d = definition(
        "ppc3",
        tce_windows=[
            {"liobn": LIOBN, "offset": 0, "size_mib": 256, "page_shift": 16},
            {"liobn": DDW, "offset": 1 << 40, "size_mib": 64, "page_shift": 16},
        ],
        devices=[{"id": "blk0", "driver": "pds", "dma_region": [0x200000, 0x10000], "seed": 8}],
    )
    hosts.a.post("/v1/vms", {"definition": d, "start": True})
    poll(lambda: report(hosts.a, "ppc3")["vfio"]["devices"]["blk0"]["dma_writes"] > 5)
    before = report(hosts.a, "ppc3")["spapr-tce"]
    ddw = {w["liobn"]: w for w in before["windows"]}[DDW]
    assert ddw["mapped"] == ddw["hw_mapped"][0] == 1024  # all of RAM, direct

    job = hosts.migrate("ppc3")
    assert job["status"] == "completed", job
    check = job["stats"]["verification"]
    assert check["ram_equal"] and check["verified"], check
    rebuild = job["stats"]["destination_report"]["spapr-tce"]["rebuild"]
    assert rebuild["cleared"] == 0 and rebuild["mapped"] == 1024 + 9

    migrated = report(hosts.b, "ppc3")["vfio"]["devices"]["blk0"]["dma_writes"]
    r = poll(
        lambda: (
            (x := report(hosts.b, "ppc3"))["vfio"]["devices"]["blk0"]["dma_writes"] > migrated + 5
            and x
        )
    )
    assert r["spapr-tce"]["dma_faults"] == 0 and r["spapr-dma:nic0"]["faults"] == 0
    hosts.b.post("/v1/vms/ppc3/pause", {})
    assert report(hosts.b, "ppc3")["spapr-tce"]["invariants"] == "ok"
