"""Reference drivers: running devices, DMA discipline, save/restore, factory validation."""

from __future__ import annotations

import pytest

from vmferry.errors import ConfigError
from vmferry.hw.vfio import DeviceState, VfioError, create_device
from vmferry.hw.vfio.drivers import Activity
from vmferry.testing.memory import ByteMemory
from vmferry.testing.vfio import MEM, SPECS, make, resume, save_stop_copy, save_with_precopy

S = DeviceState
KINDS = ["mlx5", "pds", "pds_p2p", "hisi_acc"]


@pytest.mark.parametrize("kind", KINDS)
def test_running_device_changes_state_and_dirties_guest_ram(kind: str) -> None:
    memory = ByteMemory(MEM)
    dev = create_device(SPECS[kind], memory)
    before = dev.state_digest()
    assert dev.run(10) == 10
    assert dev.state_digest() != before
    assert memory.take_dirty()


@pytest.mark.parametrize("kind", KINDS)
def test_no_dma_and_no_progress_when_quiesced_or_stopped(kind: str) -> None:
    memory = ByteMemory(MEM)
    dev = create_device(SPECS[kind], memory)
    targets = [S.STOP, S.STOP_COPY, S.STOP, S.RESUMING]
    if dev.migration_flags & 2:
        targets.insert(0, S.RUNNING_P2P)
    for target in targets:
        dev.set_state(target)
        assert dev.driver is not None and dev.driver.activity is not Activity.ACTIVE
        memory.take_dirty()
        digest = dev.state_digest()
        assert dev.run(10) == 0
        assert dev.state_digest() == digest and not memory.take_dirty()


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_behaviour(kind: str) -> None:
    a, b = make(kind), make(kind)
    a.run(25)
    b.run(25)
    assert a.state_digest() == b.state_digest()
    c = make(kind, seed=99)
    c.run(25)
    assert c.state_digest() != a.state_digest()


@pytest.mark.parametrize("kind", KINDS)
def test_save_restore_on_fresh_device_continues_identically(kind: str) -> None:
    src, dst = make(kind), make(kind)
    data, digest = save_stop_copy(src, ticks=30)
    resume(dst, [data])
    assert dst.state_digest() == digest
    src.set_state(S.RUNNING)
    dst.set_state(S.RUNNING)
    src.run(15)
    dst.run(15)
    assert dst.state_digest() == src.state_digest()


@pytest.mark.parametrize("kind", ["mlx5", "hisi_acc"])
def test_precopy_session_restores(kind: str) -> None:
    src, dst = make(kind), make(kind)
    pre, final, digest = save_with_precopy(src)
    resume(dst, [pre, final])
    assert dst.state_digest() == digest


def test_mlx5_precopy_grows_with_dirtied_state() -> None:
    dev = make("mlx5")
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    stream.read(stream.precopy_info().initial_bytes)
    sizes = []
    for _ in range(3):
        dev.run(40)
        info = stream.precopy_info()
        sizes.append(info.dirty_bytes)
        stream.read(info.dirty_bytes)
    assert all(size > 0 for size in sizes)


@pytest.mark.parametrize("kind", ["mlx5", "pds", "hisi_acc"])
def test_foreign_or_corrupted_state_rejected_and_device_untouched(kind: str) -> None:
    data, _ = save_stop_copy(make(kind, seed=1))
    corrupted = bytearray(data)
    corrupted[len(data) // 2 + 1] ^= 0xFF
    dst = make(kind)
    dst.run(5)
    before = dst.state_digest()
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    with pytest.raises(VfioError):
        stream.write_all(bytes(corrupted))
        dst.set_state(S.STOP)
    assert dst.state_digest() == before and dst.state == S.RESUMING
    dst.reset()


def test_resume_accept_any_fault_loads_garbage() -> None:
    data, digest = save_stop_copy(make("pds"))
    dst = make("pds", faults=["resume_accept_any"])
    resume(dst, [data[:1000]])  # truncated, yet committed
    assert dst.state_digest() != digest


def test_capability_says_whether_destination_can_host() -> None:
    src = make("hisi_acc").capability()
    assert make("hisi_acc").capability().refusal(src) is None
    assert "qp_num" in (make("hisi_acc", qp_num=4).capability().refusal(src) or "")
    assert "driver" in (make("mlx5").capability().refusal(src) or "")
    assert make("mlx5").capability().as_dict()["flags"] == 7


@pytest.mark.parametrize(
    "bad",
    [
        {"driver": "nvme"},
        {"colour": "blue"},
        {"qp_num": 3},  # a hisi_acc key on mlx5
        {"state_mib": -1},
        {"state_mib": 0.001},  # not a whole number of pages
        {"dma_region": [0, 1 << 40]},
        {"dma_region": "0x1000"},
        {"seed": "one"},
        {"faults": ["no_such_fault"]},
        {"id": ""},
    ],
)
def test_factory_rejects_bad_entries(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        create_device({**SPECS["mlx5"], **bad}, ByteMemory(MEM))


def test_factory_hisi_has_fixed_state_size() -> None:
    with pytest.raises(ConfigError, match="state_mib"):
        create_device({**SPECS["hisi_acc"], "state_mib": 1}, ByteMemory(MEM))


@pytest.mark.parametrize("kind", ["mlx5", "pds", "hisi_acc"])
def test_dma_marks_pages_dirty_in_guest_ram(kind: str) -> None:
    from vmferry.machine.ram import GuestRam

    ram = GuestRam(1 << 20)
    dev = create_device(SPECS[kind], ram)
    ram.start_dirty_log()
    dev.run(20)
    gpa, size = SPECS[kind]["dma_region"]  # type: ignore[misc]
    dirty = set(ram.dirty.nonzero()[0].tolist())
    assert dirty and all(gpa // 4096 <= p < (gpa + size) // 4096 for p in dirty)


def test_stale_fd_fault_leaks_live_device_state() -> None:
    from vmferry.errors import InvariantViolation

    dev = make("pds", faults=["stale_fd"])
    stream = dev.set_state(S.STOP_COPY)
    assert stream is not None
    stream.read(32)  # the blob header
    dev.set_state(S.RUNNING)
    dev.run(50)  # the device runs again; the orphaned file still maps its memory
    assert dev.driver is not None
    live = dev.driver.image.tobytes()  # type: ignore[attr-defined]
    assert stream.read(len(live)) == live
    with pytest.raises(InvariantViolation, match="orphaned"):
        dev.check_invariants()
