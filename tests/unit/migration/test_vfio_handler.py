"""VFIO devices in live migration: the handler under the sans-IO engine (in-process Link)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.migration.test_engine import Link
from vmferry.clock import ManualClock
from vmferry.errors import ConfigError, MalformedRecord, MigrationError, MigrationRefused
from vmferry.hw.vfio import DeviceState, VfioMigrationDevice
from vmferry.machine import VM, HostContext, create_vm
from vmferry.machine.handlers import DeviceData, DevicePhase
from vmferry.machine.vfio import DeviceLoadError, VfioHandler
from vmferry.migration.context import Status
from vmferry.migration.source import MigrationParams, SourceSession

S = DeviceState
MLX5 = {"id": "nic0", "driver": "mlx5", "state_mib": 1, "dma_region": [0x100000, 0x10000],
        "seed": 3}  # fmt: skip
PDS = {"id": "blk0", "driver": "pds", "p2p": True, "dma_region": [0x200000, 0x10000], "seed": 4}
HISI = {"id": "acc0", "driver": "hisi_acc", "dma_region": [0x300000, 0x1000], "seed": 5}


def definition(*devices: dict[str, Any], rate: float = 20.0) -> dict[str, Any]:
    return {"name": "d", "memory_mib": 16, "vcpus": 2, "fill": "random",
            "workload": {"dirty_rate_mbps": rate}, "devices": list(devices)}  # fmt: skip


def running_vm(*devices: dict[str, Any], rate: float = 20.0) -> VM:
    vm = create_vm(definition(*devices, rate=rate))
    vm.start()
    vm.run_slice(0.05)
    return vm


def handler(vm: VM) -> VfioHandler:
    h = vm.handlers["vfio"]
    assert isinstance(h, VfioHandler)
    return h


def states(vm: VM) -> dict[str, DeviceState]:
    return {i: d.state for i, d in handler(vm).devices.items()}


@pytest.fixture
def transitions(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[tuple[VfioMigrationDevice, DeviceState]]]:
    """Every successful device state change, across all devices, in order."""
    log: list[tuple[VfioMigrationDevice, DeviceState]] = []
    original = VfioMigrationDevice._set_state

    def traced(self: VfioMigrationDevice, new: int) -> Any:
        out = original(self, new)
        log.append((self, DeviceState(new)))
        return out

    monkeypatch.setattr(VfioMigrationDevice, "_set_state", traced)
    yield log


def push_all(link: Link) -> None:
    link.push(link.src.start())
    while bufs := link.src.next_buffers():
        link.push(bufs)


# --- end to end ----------------------------------------------------------------------


def test_two_drivers_migrate_with_equal_state(
    transitions: list[tuple[VfioMigrationDevice, DeviceState]],
) -> None:
    vm = running_vm(MLX5, PDS)
    link = Link(vm, MigrationParams(downtime_limit_ms=30), bandwidth=80e6)
    assert link.src.preflight(create_vm(vm.definition.to_dict()).capabilities()) == []
    out = link.run()
    assert link.src.stats.status is Status.COMPLETED and len(link.src.stats.passes) >= 2
    assert out["ack"]["digests"] == out["source"]
    assert out["source"]["handler:vfio"].count(":") == 2
    assert link.dst.vm is not None
    assert states(link.dst.vm) == {"nic0": S.RUNNING, "blk0": S.RUNNING}
    assert states(vm) == {"nic0": S.STOP, "blk0": S.STOP}
    assert out["ack"]["post_load"]["vfio"] == {"devices": {"nic0": "RUNNING", "blk0": "RUNNING"}}
    # the devices worked while the guest ran and their DMA dirtied guest RAM
    assert all(d.driver is not None and d.driver.dma_writes > 0
               for d in handler(vm).devices.values())  # fmt: skip
    # the multi-device rule: every device in a P2P state before any device stops
    mine = handler(vm).devices
    source = [(d.name, s) for d, s in transitions if d in mine.values()]
    stops = [i for i, (_, s) in enumerate(source) if s in (S.STOP, S.STOP_COPY)]
    p2p = [i for i, (_, s) in enumerate(source) if s in (S.RUNNING_P2P, S.PRE_COPY_P2P)]
    assert len(p2p) == 2 and max(p2p) < min(stops)
    assert [s for n, s in source if n == "nic0"] == [S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY,
                                                      S.STOP]  # fmt: skip
    assert [s for n, s in source if n == "blk0"] == [S.RUNNING_P2P, S.STOP, S.STOP_COPY, S.STOP]


def test_destination_validates_every_device_before_any_runs(
    transitions: list[tuple[VfioMigrationDevice, DeviceState]],
) -> None:
    link = Link(running_vm(MLX5, PDS), MigrationParams())
    push_all(link)
    transitions.clear()
    link.dec.eof()
    link.dst.finish()
    order = [s for _, s in transitions]
    assert order == [S.STOP, S.STOP, S.RUNNING_P2P, S.RUNNING_P2P, S.RUNNING, S.RUNNING]


def test_precopy_data_flows_and_counts_in_the_expected_downtime() -> None:
    vm = running_vm(MLX5, rate=0)
    link = Link(vm, MigrationParams(downtime_limit_ms=1), bandwidth=50e6)
    link.push(link.src.start())
    link.push(link.src.next_buffers())  # pass 1 (pre-copy data + RAM)
    while link.src.stats.status is Status.ACTIVE and not link.src.stats.passes:
        link.push(link.src.next_buffers())
    h = handler(vm)
    assert h.bytes_saved["nic0"] >= 1 << 20  # the FULL image went out during pre-copy
    first = link.src.stats.passes[0]
    # what the decision counted: the dirty pages and the device's FINAL delta (its
    # STOP_COPY estimate once pre-copy is on), not the image that already went out
    remaining = first.expected_downtime_ms * 1e-3 * first.bytes / first.seconds
    assert remaining >= (first.dirty_pages * 4096 + 56) * 0.999
    assert remaining < 1 << 20
    link.src.fail("test", "stop")


def test_hisi_acc_alone_migrates() -> None:
    vm = running_vm(HISI)
    out = Link(vm, MigrationParams()).run()
    assert out["ack"]["digests"]["handler:vfio"] == out["source"]["handler:vfio"]
    assert states(vm) == {"acc0": S.STOP}


def test_offline_migration_stops_devices_first() -> None:
    vm = running_vm(MLX5, PDS)
    out = Link(vm, MigrationParams(offline=True)).run()
    assert out["ack"]["digests"] == out["source"]


# --- refusals ------------------------------------------------------------------------


def caps(*devices: dict[str, Any], host: HostContext | None = None) -> dict[str, Any]:
    scratch = create_vm(definition(*devices), host)
    try:
        return scratch.capabilities()
    finally:
        scratch.close()


@pytest.mark.parametrize("compat", ["preflight", "qemu"])
def test_device_without_migration_support_is_refused(compat: str) -> None:
    vm = running_vm(MLX5, {**PDS, "migration": False})
    src = SourceSession(vm, MigrationParams(compat=compat), ManualClock())
    with pytest.raises(MigrationRefused, match="blk0 has no migration support"):
        src.preflight(caps(MLX5, PDS))
    assert states(vm)["nic0"] is S.RUNNING and not vm.ram.logging


@pytest.mark.parametrize("compat", ["preflight", "qemu"])
@pytest.mark.parametrize("other", [HISI, {**PDS, "p2p": False}])
def test_multi_device_rule_refuses_a_device_without_p2p(compat: str, other: dict[str, Any]) -> None:
    vm = running_vm(MLX5, other)
    src = SourceSession(vm, MigrationParams(compat=compat), ManualClock())
    with pytest.raises(MigrationRefused, match=f"{other['id']}.*lack P2P"):
        src.preflight(caps(MLX5, other))
    assert set(states(vm).values()) == {S.RUNNING}


@pytest.mark.parametrize("compat", ["preflight", "qemu"])
def test_destination_without_the_device_type_is_refused(compat: str) -> None:
    vm = running_vm(MLX5, PDS)
    dest = caps(MLX5, PDS)
    dest["vfio"]["drivers"] = ["pds"]
    src = SourceSession(vm, MigrationParams(compat=compat), ManualClock())
    with pytest.raises(MigrationRefused, match="nic0: the destination cannot host a mlx5"):
        src.preflight(dest)
    assert set(states(vm).values()) == {S.RUNNING}


def test_host_without_the_driver_cannot_build_the_vm() -> None:
    host = HostContext("B", platform={"vfio_drivers": ["pds"]})
    with pytest.raises(ConfigError, match="host B has no mlx5 device"):
        create_vm(definition(MLX5, PDS), host)
    assert create_vm(definition(PDS), host).handlers["vfio"].device_ids == {"blk0"}


def test_layout_difference_refused_up_front_or_rejected_on_load() -> None:
    vm = running_vm(HISI)
    other = {**HISI, "qp_num": 4}
    src = SourceSession(vm, MigrationParams(), ManualClock())
    with pytest.raises(MigrationRefused, match="acc0: destination cannot host it: device layout"):
        src.preflight(caps(other))
    # QEMU mode: no layout check up front; the destination driver refuses the state
    link = Link(vm, MigrationParams(compat="qemu"))
    assert link.src.preflight(caps(other)) == []
    link.dst.factory = lambda d: create_vm({**d, "devices": [other]})
    with pytest.raises(DeviceLoadError, match="acc0 rejected state chunk #0: EFAULT"):
        push_all(link)
    link.src.fail("load", "destination refused")
    link.dst.abort()
    assert states(vm) == {"acc0": S.RUNNING}


def test_unreadable_destination_capabilities_are_a_refusal() -> None:
    vm = running_vm(PDS)
    src = SourceSession(vm, MigrationParams(), ManualClock())
    with pytest.raises(MigrationRefused, match="unreadable destination capabilities"):
        src.preflight({"vfio": {"drivers": ["pds"], "devices": {"blk0": "zz"}}})


def test_bad_device_definitions() -> None:
    for devices, word in [
        ([MLX5, MLX5], "appears twice"),
        ([{**PDS, "migration": "no"}], "migration must be a bool"),
        ([{**PDS, "colour": 1}], "unknown key"),
        ("pds", "list of device tables"),
    ]:
        with pytest.raises(ConfigError, match=word):
            create_vm({"name": "x", "memory_mib": 16, "devices": devices})
    with pytest.raises(ConfigError, match="vfio_drivers"):
        create_vm(definition(PDS), HostContext("B", platform={"vfio_drivers": ["nvidia"]}))


# --- failures ------------------------------------------------------------------------


def test_failure_during_precopy_gives_devices_back_running() -> None:
    vm = running_vm(MLX5, PDS)
    link = Link(vm, MigrationParams(downtime_limit_ms=1), bandwidth=50e6)
    link.push(link.src.start())
    link.push(link.src.next_buffers())
    assert states(vm)["nic0"] is S.PRE_COPY
    link.src.fail("ram pass 1", "connection cut")
    assert set(states(vm).values()) == {S.RUNNING} and vm.running
    assert all(not d.leaked_files() for d in handler(vm).devices.values())
    before = {i: d.state_digest() for i, d in handler(vm).devices.items()}
    vm.run_slice(0.05)  # the devices work again
    assert before != {i: d.state_digest() for i, d in handler(vm).devices.items()}
    out = Link(vm, MigrationParams()).run()  # and can migrate again
    assert out["ack"]["digests"] == out["source"]


def test_failure_after_switchover_gives_devices_back_running() -> None:
    vm = running_vm(MLX5, PDS)
    link = Link(vm, MigrationParams())
    push_all(link)
    assert states(vm) == {"nic0": S.STOP_COPY, "blk0": S.STOP_COPY} and not vm.running
    link.src.fail("awaiting destination load", "destination failed")
    assert set(states(vm).values()) == {S.RUNNING} and vm.running


def test_destination_rejecting_corrupt_state_resets_its_devices() -> None:
    vm = running_vm(MLX5, {**PDS, "faults": ["corrupt_save"]})
    link = Link(vm, MigrationParams())
    push_all(link)
    link.dec.eof()
    dst_vm = link.dst.vm
    assert dst_vm is not None
    with pytest.raises(DeviceLoadError, match="blk0 rejected its state on load: EINVAL"):
        link.dst.finish()
    dst_devices = handler(dst_vm).devices
    link.dst.abort()
    assert {d.state for d in dst_devices.values()} == {S.RUNNING}
    assert all(d.driver is not None and d.driver.resuming is None for d in dst_devices.values())
    link.src.fail("awaiting destination load", "destination failed")
    assert set(states(vm).values()) == {S.RUNNING}


def test_destination_failure_after_load_resets_running_devices() -> None:
    link = Link(running_vm(MLX5, PDS), MigrationParams())
    push_all(link)
    link.dec.eof()
    link.dst.finish(start=False)
    dst_vm = link.dst.vm
    assert dst_vm is not None and set(states(dst_vm).values()) == {S.RUNNING}
    devices = handler(dst_vm).devices
    loaded = {i: d.state_digest() for i, d in devices.items()}
    link.dst.abort()  # no commit came: the loaded state must not survive
    assert set(states(dst_vm).values()) == {S.RUNNING}
    assert all(d.state_digest() != loaded[i] for i, d in devices.items())


# --- the stream's device chunks ------------------------------------------------------


def loading_handler() -> VfioHandler:
    vm = create_vm(definition(PDS))
    h = handler(vm)
    h.load_setup()
    return h


def test_chunks_must_arrive_in_order() -> None:
    h = loading_handler()
    with pytest.raises(MalformedRecord, match="chunk #1, expected #0"):
        h.load(DeviceData("blk0", DevicePhase.STOP_COPY, 1, b"x"))
    h = loading_handler()
    h.load(DeviceData("blk0", DevicePhase.STOP_COPY, 0, b""))
    with pytest.raises(MalformedRecord, match="PRE_COPY chunk after STOP_COPY"):
        h.load(DeviceData("blk0", DevicePhase.PRE_COPY, 1, b""))
    with pytest.raises(MalformedRecord, match="DONE chunk carries data"):
        h.load(DeviceData("blk0", DevicePhase.DONE, 1, b"x"))
    h.load(DeviceData("blk0", DevicePhase.DONE, 1, b""))
    with pytest.raises(MalformedRecord, match="STOP_COPY chunk after DONE"):
        h.load(DeviceData("blk0", DevicePhase.STOP_COPY, 2, b""))


def test_missing_done_chunk_is_incomplete_state() -> None:
    h = loading_handler()
    with pytest.raises(MalformedRecord, match=r"incomplete \(no DONE chunk\): \['blk0'\]"):
        h.load_complete()


def test_destination_device_without_migration_support_cannot_resume() -> None:
    vm = create_vm(definition({**PDS, "migration": False}))
    with pytest.raises(MigrationError, match="blk0 cannot resume"):
        handler(vm).load_setup()
