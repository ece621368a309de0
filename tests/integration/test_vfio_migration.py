"""VFIO devices migrating between two host daemons: state equal at switchover, refusals
before anything moves, and every failure giving the source devices back RUNNING."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import Pair, digest, vm_names, wait_job
from vmferry.errors import ApiError
from vmferry.host.processes import spawn_host

pytestmark = pytest.mark.integration

MLX5 = {"id": "nic0", "driver": "mlx5", "state_mib": 2, "dma_region": [0x100000, 0x10000],
        "seed": 7}  # fmt: skip
PDS = {"id": "blk0", "driver": "pds", "p2p": True, "dma_region": [0x200000, 0x10000], "seed": 8}
HISI = {"id": "acc0", "driver": "hisi_acc", "dma_region": [0x300000, 0x1000], "seed": 9}


def devices_of(pair_client: Any, name: str) -> dict[str, Any]:
    out: dict[str, Any] = pair_client.get(f"/v1/vms/{name}")["report"]["vfio"]["devices"]
    return out


def create(pair: Pair, name: str, *devices: dict[str, Any], rate: float = 10.0) -> None:
    pair.create(name, devices=list(devices), workload={"dirty_rate_mbps": rate})
    # let the devices work (and DMA into guest RAM) for a while
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(d["dma_writes"] > 0 for d in devices_of(pair.a, name).values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"the devices of {name} never ran")


def assert_source_devices_running(pair: Pair, name: str) -> None:
    vm = pair.a.get(f"/v1/vms/{name}")
    assert vm["runstate"] == "running"
    assert {d["state"] for d in vm["report"]["vfio"]["devices"].values()} == {"RUNNING"}
    assert name not in vm_names(pair.b)
    # and they work again: their DMA counters move
    before = {i: d["dma_writes"] for i, d in devices_of(pair.a, name).items()}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = devices_of(pair.a, name)
        if all(now[i]["dma_writes"] > n for i, n in before.items()):
            return
        time.sleep(0.05)
    raise AssertionError(f"the devices of {name} did not run again")


def destination_job(pair: Pair, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        job: dict[str, Any] = [j for j in pair.b.get("/v1/jobs") if j["vm"] == name][-1]
        if job["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_two_devices_of_different_drivers_migrate_with_equal_state(pair: Pair) -> None:
    create(pair, "vf-two", MLX5, PDS)
    job = pair.migrate("vf-two")
    assert job["status"] == "completed", job
    verification = job["stats"]["verification"]
    assert verification["verified"], verification
    src, dst = verification["source"]["handler:vfio"], verification["destination"]["handler:vfio"]
    assert src == dst and src.startswith("blk0:") and ";nic0:" in src
    assert job["stats"]["device-bytes"] > 2 << 20  # the mlx5 image at least
    assert job["stats"]["downtime-breakdown"]["state_ms"] > 0
    assert job["stats"]["destination_report"]["vfio"]["devices"] == {
        "nic0": "RUNNING", "blk0": "RUNNING"}  # fmt: skip
    moved = pair.b.get("/v1/vms/vf-two")
    assert moved["runstate"] == "running"
    assert {d["state"] for d in moved["report"]["vfio"]["devices"].values()} == {"RUNNING"}
    # the devices run on at the destination
    before = moved["report"]["vfio"]["devices"]["nic0"]["dma_writes"]
    deadline = time.monotonic() + 10
    while devices_of(pair.b, "vf-two")["nic0"]["dma_writes"] <= before:
        assert time.monotonic() < deadline, "the migrated device never ran"
        time.sleep(0.05)


@pytest.mark.parametrize("compat", ["preflight", "qemu"])
@pytest.mark.parametrize(
    ("devices", "words"),
    [
        ([MLX5, {**PDS, "migration": False}], "blk0 has no migration support"),
        ([MLX5, HISI], "lack P2P"),
    ],
    ids=["no-migration-support", "p2p-rule"],
)
def test_refused_before_anything_moves(
    pair: Pair, compat: str, devices: list[dict[str, Any]], words: str
) -> None:
    name = f"vf-refuse-{compat}-{devices[1]['id']}"
    pair.create(name, devices=devices)
    before = digest(pair.a, name)
    job = pair.migrate(name, compat=compat)
    assert job["status"] == "failed" and job["step"] == "pre-flight", job
    assert words in job["error"]
    assert job["stats"]["ram"]["transferred"] == 0
    vm = pair.a.get(f"/v1/vms/{name}")
    assert vm["runstate"] == "running" and name not in vm_names(pair.b)
    deadline = time.monotonic() + 10
    while digest(pair.a, name)["vcpu"] == before["vcpu"]:  # the guest still runs
        assert time.monotonic() < deadline, "the refused VM stopped running"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pds_only_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("pds-only")
    platform = root / "platform.toml"
    platform.write_text('vfio_drivers = ["pds"]\n')
    host = spawn_host("C", root / "C", extra_args=["--platform", str(platform)])
    try:
        yield host.control_url
    finally:
        host.stop()


@pytest.mark.parametrize("compat", ["preflight", "qemu"])
def test_destination_without_the_device_type_refuses(
    pair: Pair, pds_only_host: str, compat: str
) -> None:
    name = f"vf-nohost-{compat}"
    create(pair, name, MLX5, PDS)
    with pytest.raises(ApiError, match="host C has no mlx5 device"):
        pair.a.post(f"/v1/vms/{name}/migrate",
                    {"destination": pds_only_host, "params": {"compat": compat}})  # fmt: skip
    assert_source_devices_running(pair, name)


@pytest.mark.parametrize("fault", ["active:cut", "device:cut", "ack:cut", "active:corrupt"])
def test_connection_faults_give_the_devices_back(pair: Pair, fault: str) -> None:
    name = "vf-" + fault.replace(":", "-")
    create(pair, name, MLX5, PDS)
    job = pair.migrate(name, fault=fault)
    assert job["status"] == "failed", job
    assert_source_devices_running(pair, name)
    assert destination_job(pair, name)["status"] == "failed"


def test_destination_rejecting_device_state_fails_cleanly(pair: Pair) -> None:
    create(pair, "vf-corrupt", MLX5, {**PDS, "faults": ["corrupt_save"]})
    job = pair.migrate("vf-corrupt")
    assert job["status"] == "failed", job
    assert "blk0 rejected its state on load" in job["error"] and "EINVAL" in job["error"]
    assert_source_devices_running(pair, "vf-corrupt")
    dest = destination_job(pair, "vf-corrupt")
    assert dest["status"] == "failed" and dest["step"] == "load"


def test_hisi_acc_alone_migrates(pair: Pair) -> None:
    create(pair, "vf-acc", HISI)
    job = pair.migrate("vf-acc")
    assert job["status"] == "completed" and job["stats"]["verification"]["verified"], job
    assert devices_of(pair.b, "vf-acc")["acc0"]["state"] == "RUNNING"
    assert wait_job(pair.a, job["id"])["status"] == "completed"


def test_snapshot_of_a_vm_with_devices(
    pair: Pair, tmp_path_factory: pytest.TempPathFactory
) -> None:
    create(pair, "vf-snap", MLX5, PDS)
    file = pair.images / "vf-snap.vmf"
    pair.a.post("/v1/vms/vf-snap/save", {"path": str(file)})
    assert_source_devices_running(pair, "vf-snap")  # the saved VM runs on, devices too
    pair.b.post("/v1/restore", {"path": str(file), "start": True})
    restored = devices_of(pair.b, "vf-snap")
    assert {d["state"] for d in restored.values()} == {"RUNNING"}
