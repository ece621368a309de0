"""Issue 17, item 4: the devices' share of the downtime, predicted from what pre-copy
timed on the same devices.

Stopping a device that is in pre-copy saves its state once more (mlx5: the
PRE_COPY_P2P -> STOP_COPY arc runs the save a precopy-info query starts), and the
destination's final load is one more image of the kind it loaded last in pre-copy (the
model's mlx5 checks the whole device image after each).  Both cost more than their bytes:
before, the stop was not predicted at all and the final load at the per-byte rate of the
initial image (64 MiB of device state: -37..-49 %).  Here a device whose save takes a
known time (the clock moves while it saves or loads an image) shows each term exact."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.migration.test_issue17_switchover_ack import AckLink
from tests.unit.migration.test_prediction import Probe
from tests.unit.migration.test_vfio_handler import MLX5, PDS, handler, running_vm
from vmferry.clock import ManualClock
from vmferry.hw.vfio.drivers.mlx5 import Mlx5Driver
from vmferry.machine.handlers import MigrationHandler
from vmferry.migration.context import MigrationStats, Status
from vmferry.migration.devicestate import AckGate

SAVE_S = 0.007
LOAD_S = 0.005


@pytest.fixture
def slow_images(monkeypatch: pytest.MonkeyPatch) -> list[ManualClock]:
    """Saving an image takes the device SAVE_S and loading one LOAD_S of the clock the
    test puts in the returned list."""
    clocks: list[ManualClock] = []
    save, load = Mlx5Driver._image_record, Mlx5Driver._load_image

    def timed_save(self: Mlx5Driver, *a: Any, **kw: Any) -> Any:
        clocks[0].advance(SAVE_S)
        return save(self, *a, **kw)

    def timed_load(self: Mlx5Driver, *a: Any, **kw: Any) -> Any:
        clocks[0].advance(LOAD_S)
        return load(self, *a, **kw)

    monkeypatch.setattr(Mlx5Driver, "_image_record", timed_save)
    monkeypatch.setattr(Mlx5Driver, "_load_image", timed_load)
    return clocks


def test_issue17_4_vfio_handler_times_the_saves_pre_copy_starts(
    slow_images: list[ManualClock],
) -> None:
    clock = ManualClock()
    slow_images.append(clock)
    vm = running_vm(MLX5, PDS, rate=0)
    h = handler(vm)
    assert h.stop_cost_s() == 0.0  # nothing timed yet
    h.timed_by(clock)
    h.save_setup()
    # entering PRE_COPY saved the initial image; the stop-copy-only device saved nothing
    assert h.save_s == {"nic0": pytest.approx(SAVE_S)}
    while h.save_iterate():
        pass
    saves = clock.monotonic()
    vm.run_slice(0.2)  # the device dirties its state: the next query starts a delta
    while h.save_iterate():
        pass
    assert clock.monotonic() - saves == pytest.approx(SAVE_S)  # one delta was saved
    assert h.stop_cost_s() == pytest.approx(SAVE_S)
    # and the stop does run one more save, which the prediction now counts
    t0 = clock.monotonic()
    h.quiesce()
    assert clock.monotonic() - t0 == pytest.approx(SAVE_S)
    assert h.stop_cost_s() == 0.0  # nothing left in pre-copy
    h.save_failed()


def test_issue17_4_base_handlers_cost_nothing_to_stop() -> None:
    class Plain(MigrationHandler):
        name = "plain"

    p = Plain()
    p.timed_by(ManualClock())
    assert p.stop_cost_s() == 0.0


def test_issue17_4_prediction_counts_the_devices_stop_and_final_load(
    slow_images: list[ManualClock],
) -> None:
    link = AckLink(dict(MLX5, state_mib=2))
    slow_images.append(link.clock)
    link.push(link.src.start())
    while not link.src.ack.awaiting:
        link.push(link.src.next_buffers())
        link.vm.run_slice(0.05)
    ack = link.dst.take_switchover_ack()
    assert ack is not None
    report = link.dst.device_load_report()
    assert report["nic0"][0] >= LOAD_S * 1e3  # the chunk that completed the image
    # the host reads the report from the destination's job with its round trips
    link.src.ack.last_loads = {d: (ms / 1e3, int(n)) for d, (ms, n) in report.items()}
    link.src.switchover_acknowledged(ack)
    while link.src.stats.status is Status.ACTIVE:
        link.push(link.src.next_buffers())
    p = link.src.stats.predicted
    assert p["device_stop_ms"] == pytest.approx(SAVE_S * 1e3)
    assert p["device_load_ms"] + p["state_ms"] >= LOAD_S * 1e3
    while bufs := link.src.next_buffers():
        link.push(bufs)
    link.dec.eof()
    link.dst.finish(start=False)
    # the stop did cost the save it predicted (the guest and the device paused)
    assert link.src.stats.switchover_parts["pause_ms"] == pytest.approx(SAVE_S * 1e3)


def test_issue17_4_final_load_is_the_last_chunk_plus_the_bytes_beyond_it() -> None:
    gate = AckGate()
    gate.enabled = True
    gate.markers_due = 1
    gate.acknowledged({"device_bytes": 1_000_000, "load_ms": 8.0}, MigrationStats())  # 8 ns/byte
    # before: the bytes at the rate only (a 10 kB delta: 0.08 ms)
    assert gate.device_load_ms(10_000) == pytest.approx(0.08)
    # the last pre-copy chunk (a 12 kB delta) took 6 ms to load: the final one, smaller,
    # costs that; a larger one the bytes beyond it at the rate on top
    gate.last_loads = {"nic0": (0.006, 12_000)}
    assert gate.device_load_ms(10_000) == pytest.approx(6.0)
    assert gate.device_load_ms(512_000) == pytest.approx(6.0 + 500_000 * 8e-6)
    # no ack (no rate) but a timed chunk: the chunk's time alone
    other = AckGate()
    other.last_loads = {"a": (0.002, 100), "b": (0.003, 100)}
    assert other.device_load_ms(150) == pytest.approx(5.0)
    assert AckGate().device_load_ms(10_000) == 0.0


class _Destination(Probe):
    """The host's link probe: the decision's round trips read the destination's job,
    where it published its last device loads by then."""

    def __init__(self, gate: AckGate) -> None:
        super().__init__(in_flight=0, rtt=0.001)
        self.gate, self.reads = gate, 0

    def round_trip_s(self) -> float:
        """Each read finds a later chunk loaded, which took ``reads`` x 10 ms."""
        self.reads += 1
        self.gate.last_loads = {"nic0": (0.01 * self.reads, 300_000)}
        return super().round_trip_s()


def test_issue17_4_device_loads_are_read_after_the_decisions_round_trips() -> None:
    """The device term must use what the decision's own round trips read (a pass's
    earlier read can predate the last delta: the 64 MiB device then got the load of a
    1 MiB piece of its initial image, 1 ms for 10)."""
    link = AckLink(dict(MLX5, state_mib=2))
    probe = _Destination(link.src.ack)
    link.src.link = probe
    link.push(link.src.start())
    while not link.src.ack.awaiting:
        link.push(link.src.next_buffers())
    ack = link.dst.take_switchover_ack()
    assert ack is not None
    link.src.switchover_acknowledged(ack)
    while link.src.stats.status is Status.ACTIVE:
        link.push(link.src.next_buffers())
    p = link.src.stats.predicted
    assert probe.reads >= 1
    assert p["device_load_ms"] + p["state_ms"] >= 10.0 * probe.reads  # the last read's
