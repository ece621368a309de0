"""Issue 17, item 3 (switchover-ack) and item 4's device-load term, under the sans-IO
engine: the source does not stop the guest before the destination loaded every pre-copy
device's initial data; the destination acknowledges once, with the load time it measured."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.migration.test_vfio_handler import MLX5, PDS, handler, running_vm
from vmferry.clock import ManualClock
from vmferry.errors import MalformedRecord, StreamUsageError
from vmferry.hw.vfio import DeviceState
from vmferry.machine.handlers import DeviceData, DevicePhase
from vmferry.machine.vfio import VfioHandler
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import migrate_locally
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import DeviceChunk, StreamDecoder

S = DeviceState


class AckLink:
    """Source and destination sessions with switchover-ack on; the ack is held until the
    test hands it over."""

    def __init__(self, *devices: dict[str, Any]) -> None:
        self.clock = ManualClock()
        self.vm = running_vm(*devices, rate=0)
        self.src = SourceSession(self.vm, MigrationParams(verify=True), self.clock)
        self.src.ack.enabled = True
        self.dst = DestinationSession(self.clock, verify=True, switchover_ack=True)
        self.dec = StreamDecoder()
        self.records: list[Any] = []

    def push(self, bufs: list[Any]) -> None:
        for b in bufs:
            self.dec.feed(b)
        for rec in self.dec.events():
            self.records.append(rec)
            self.dst.receive(rec)
        self.clock.advance(sum(len(b) for b in bufs) / 1e9)


def test_issue17_3_source_waits_for_the_ack_before_it_stops_the_guest() -> None:
    link = AckLink(dict(MLX5, state_mib=2))
    link.push(link.src.start())
    while bufs := link.src.next_buffers():
        link.push(bufs)
    assert link.src.ack.awaiting, "END before the destination acknowledged"
    # RAM converged long ago, but the guest still runs and the device is in pre-copy
    assert link.src.stats.status is Status.ACTIVE and link.vm.running
    assert link.src.current_step() == "awaiting switchover ack"
    assert handler(link.vm).devices["nic0"].state in (S.PRE_COPY, S.PRE_COPY_P2P)
    markers = [r for r in link.records if isinstance(r, DeviceChunk)
               and r.phase is DevicePhase.INIT_SENT]  # fmt: skip
    assert len(markers) == 1 and markers[0].device == "nic0"
    ack = link.dst.take_switchover_ack()
    assert ack is not None and link.dst.take_switchover_ack() is None  # once
    assert ack["device_bytes"] >= 2 << 20 and ack["load_ms"] >= 0
    # the destination's device holds the whole initial image already
    link.src.switchover_acknowledged(ack)
    assert not link.src.ack.awaiting
    while bufs := link.src.next_buffers():
        link.push(bufs)
    link.dec.eof()
    loaded = link.dst.finish(start=False)
    link.src.switchover_digests()
    assert link.src.verification(loaded)["verified"]
    link.dst.resume()
    stats = link.src.complete(loaded)
    assert stats.switchover_ack == ack
    assert "device_load_ms" in stats.predicted
    assert stats.to_json()["switchover-ack"]["device_bytes"] == ack["device_bytes"]


def test_issue17_3_asking_for_more_before_the_ack_is_a_usage_error() -> None:
    link = AckLink(MLX5)
    link.push(link.src.start())
    while not link.src.ack.awaiting:
        link.push(link.src.next_buffers())
    with pytest.raises(StreamUsageError, match="switchover ack"):
        link.src.next_buffers()
    assert link.src.stats.status is Status.FAILED
    link.src.fail("test", "no ack")
    assert link.vm.running  # never stopped


def test_issue17_3_no_precopy_device_no_wait() -> None:
    """A pds-like device has no pre-copy: no marker, no ack, no wait."""
    link = AckLink(PDS)
    link.push(link.src.start())
    while bufs := link.src.next_buffers():
        link.push(bufs)
        assert link.dst.take_switchover_ack() is None
    assert not link.src.ack.awaiting
    assert link.src.stats.status is Status.DEVICE


def test_issue17_3_local_transfer_hands_the_ack_back() -> None:
    link = AckLink(MLX5, PDS)
    ack = migrate_locally(link.src, link.dst, link.clock)
    assert link.src.stats.status is Status.COMPLETED
    assert link.src.stats.switchover_ack["device_bytes"] >= 1 << 20
    assert ack["digests"] == link.src.switchover_digests()


def test_issue17_3_destination_refuses_stray_markers() -> None:
    vm = running_vm(MLX5, PDS, rate=0)
    h = vm.handlers["vfio"]
    assert isinstance(h, VfioHandler)
    h.load_setup()
    assert h.load_switchover_ack() == 1  # only the device with pre-copy
    with pytest.raises(MalformedRecord, match="INIT_SENT"):
        h.load(DeviceData("blk0", DevicePhase.INIT_SENT, 0, b""))  # pds: no pre-copy
    with pytest.raises(MalformedRecord, match="with data"):
        h.load(DeviceData("nic0", DevicePhase.INIT_SENT, 0, b"x"))
    h.load(DeviceData("nic0", DevicePhase.INIT_SENT, 0, b""))
    with pytest.raises(MalformedRecord, match="repeated"):
        h.load(DeviceData("nic0", DevicePhase.INIT_SENT, 1, b""))
    h.load_failed()


def test_issue17_3_marker_without_switchover_ack_is_malformed() -> None:
    """A destination that did not turn switchover-ack on refuses the marker."""
    link = AckLink(MLX5)
    link.dst.switchover_ack = False
    link.push(link.src.start())
    with pytest.raises(MalformedRecord, match="INIT_SENT"):
        while True:
            link.push(link.src.next_buffers())


def test_issue17_2_prediction_adds_stop_copy_bytes_at_the_measured_load_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(VfioHandler, "stop_copy_bytes", lambda self: 500_000)
    link = AckLink(MLX5)
    link.push(link.src.start())
    while not link.src.ack.awaiting:
        link.push(link.src.next_buffers())
    assert link.dst.take_switchover_ack() is not None
    # 1 MB loaded in 8 ms: 8 ns a byte; 500 kB left for the stop: 4 ms
    link.src.switchover_acknowledged({"device_bytes": 1_000_000, "load_ms": 8.0})
    while link.src.stats.status is Status.ACTIVE:
        link.push(link.src.next_buffers())
    # in the main stream the destination loads as the chunks arrive: the device term is
    # the larger of sending the state (at the rate pre-copy measured) and loading it
    p = link.src.stats.predicted
    assert p["state_ms"] + p["device_load_ms"] == pytest.approx(max(p["state_ms"], 4.0))
    assert link.src.stats.predicted_downtime_ms >= 4.0


def test_issue17_3_device_load_error_crosses_typed_and_old_peers_can_read_it() -> None:
    from vmferry.errors import DeviceLoadError, MigrationError
    from vmferry.migration.channel import ErrorKind
    from vmferry.migration.channel import Status as Why

    st = Why.from_exception(DeviceLoadError("nic0 rejected chunk #0", "x"), "receiving")
    assert st.kind is ErrorKind.DEVICE_LOAD
    again = Why.from_json(st.for_peer(2).to_json()).exception()
    assert type(again) is DeviceLoadError and again.step == "receiving"
    old = st.for_peer(1)  # a channel 1.1 source knows no DEVICE_LOAD kind
    assert old.kind is ErrorKind.MIGRATION
    back = Why.from_json(old.to_json()).exception()
    assert type(back) is MigrationError and "DeviceLoadError: nic0 rejected" in str(back)
