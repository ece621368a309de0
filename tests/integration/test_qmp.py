"""Issue 13 item 7: each VM's QMP socket, driven by QEMU's own client library."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.integration.conftest import Pair, vm_names, wait_job
from vmferry.host.processes import spawn_host

pytestmark = pytest.mark.integration
MIB = 1 << 20


@pytest.fixture(scope="module")
def qpair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pair, Path]]:
    root = tmp_path_factory.mktemp("qmp")
    qmp_dir = root / "sockets"
    a = spawn_host("A", root / "A", extra_args=["--qmp-dir", str(qmp_dir)])
    b = spawn_host("B", root / "B")
    try:
        yield Pair(a, b), qmp_dir
    finally:
        a.stop()
        b.stop()


async def until_event(qmp: QMPClient, name: str, **data: Any) -> dict[str, Any]:
    """The next event called ``name`` whose data has ``data``'s items."""
    while True:
        event = await asyncio.wait_for(qmp.events.get(), 60)
        if event["event"] == name and all(event["data"].get(k) == v for k, v in data.items()):
            return dict(event)


async def connect(path: Path) -> QMPClient:
    for _ in range(100):
        if path.exists():
            break
        await asyncio.sleep(0.05)
    qmp = QMPClient("test")
    await qmp.connect(str(path))
    return qmp


def test_item7_qmp_status_stop_cont_and_errors(qpair: tuple[Pair, Path]) -> None:
    pair, qmp_dir = qpair
    pair.create("q1")

    async def scenario() -> None:
        qmp = await connect(qmp_dir / "q1.qmp")
        assert qmp.greeting is not None and "vmferry" in str(qmp.greeting)
        status = await qmp.execute("query-status")
        assert status == {"status": "running", "running": True, "singlestep": False}
        assert await qmp.execute("stop") == {}
        await until_event(qmp, "STOP")
        assert (await qmp.execute("query-status"))["status"] == "paused"
        await qmp.execute("cont")
        await until_event(qmp, "RESUME")
        vm = await asyncio.to_thread(pair.a.get, "/v1/vms/q1")
        assert vm["runstate"] == "running"
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("query-cpus-fast-and-furious")
        assert err.value.error_class == "CommandNotFound"
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("migrate-set-parameters", {"compress-level": 1})
        assert err.value.error_class == "GenericError"
        assert await qmp.execute("query-migrate") == {}
        await qmp.disconnect()

    asyncio.run(scenario())


def test_item7_qmp_migrate_with_live_parameter_change(qpair: tuple[Pair, Path]) -> None:
    pair, qmp_dir = qpair
    pair.create("q2", memory_mib=64)

    async def scenario() -> dict[str, Any]:
        qmp = await connect(qmp_dir / "q2.qmp")
        await qmp.execute("migrate-set-parameters",
                          {"downtime-limit": 250, "max-bandwidth": 2 * MIB,
                           "multifd-channels": 3})
        assert await qmp.execute("query-migrate-parameters") == {
            "downtime-limit": 250, "max-bandwidth": 2 * MIB, "multifd-channels": 3}
        assert await qmp.execute("migrate", {"uri": pair.b_proc.control_url}) == {}
        await until_event(qmp, "MIGRATION", status="active")
        await until_event(qmp, "MIGRATION_PASS", **{"pass": 1})
        info = await qmp.execute("query-migrate")
        assert info["status"] == "active" and info["ram"]["total"] == 64 * MIB
        # 64 MiB at 2 MiB/s would take half a minute: lift the cap while pass 1 runs
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await until_event(qmp, "STOP")
        await until_event(qmp, "MIGRATION", status="completed")
        info = await qmp.execute("query-migrate")
        status = await qmp.execute("query-status")
        await qmp.disconnect()
        return {"info": info, "status": status}

    out = asyncio.run(scenario())
    assert out["info"]["status"] == "completed" and out["info"]["downtime"] >= 0
    assert out["info"]["ram"]["transferred"] >= 64 * MIB
    assert out["status"] == {"status": "postmigrate", "running": False, "singlestep": False}
    job = [j for j in pair.a.get("/v1/jobs") if j["vm"] == "q2"][-1]
    assert job["params"]["max_bandwidth_mib"] is None
    assert job["params"]["downtime_limit_ms"] == 250
    assert job["params"]["parallel"] == 3 and job["progress"]["parallel"] == 3
    assert pair.b.get("/v1/vms/q2")["runstate"] == "running"


def test_item7_qmp_migrate_cancel(qpair: tuple[Pair, Path]) -> None:
    pair, qmp_dir = qpair
    pair.create("q3", memory_mib=64)

    async def scenario() -> None:
        qmp = await connect(qmp_dir / "q3.qmp")
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 2 * MIB})
        await qmp.execute("migrate", {"uri": pair.b_proc.control_url})
        await until_event(qmp, "MIGRATION", status="active")
        await qmp.execute("migrate_cancel")
        await until_event(qmp, "MIGRATION", status="cancelled")
        assert (await qmp.execute("query-status"))["status"] == "running"
        with pytest.raises(ExecuteError, match="same host"):
            await qmp.execute("migrate", {"uri": pair.a_proc.control_url})
        await qmp.disconnect()

    asyncio.run(scenario())
    job = [j for j in pair.a.get("/v1/jobs") if j["vm"] == "q3"][-1]
    wait_job(pair.a, job["id"])
    assert "q3" not in vm_names(pair.b)
