"""Issue 17, item 3: device state over the parallel data channels during stop-and-copy --
the DEVICE record (checksummed, typed errors) and the reassembly in index order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import ChecksumMismatch, MalformedRecord, StreamUsageError
from vmferry.machine.handlers import DeviceData, DevicePhase
from vmferry.migration.multichannel import (
    HEADER_SIZE,
    ChannelReader,
    ChannelWriter,
    Device,
    DeviceReassembler,
    deal_device,
    device_records,
)

PS = 4096


def chunks(n: int, size: int = 100) -> list[DeviceData]:
    out = [DeviceData("nic0", DevicePhase.STOP_COPY, 5 + k, bytes([k]) * size)
           for k in range(n)]  # fmt: skip
    return [*out, DeviceData("nic0", DevicePhase.DONE, 5 + n, b"")]


def wire(bufs: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def read_all(reader: ChannelReader, raw: bytes) -> list[tuple[int, DeviceData]]:
    out, at = [], 0
    while at < len(raw):
        ev = reader.header(raw[at : at + HEADER_SIZE])
        at += HEADER_SIZE
        assert isinstance(ev, Device)
        out.append(reader.device_payload(raw[at : at + ev.length]))
        at += ev.length
    return out


def test_issue17_3_device_records_round_trip() -> None:
    pieces = chunks(3)
    writer = ChannelWriter(1, PS)
    raw = wire(device_records(writer, 4, list(enumerate(pieces))))
    assert writer.bytes_out == len(raw)
    got = read_all(ChannelReader(1, 16, PS, first_pass=4), raw)
    assert [i for i, _ in got] == [0, 1, 2, 3]
    assert [(p.device, p.phase, p.seq, bytes(p.data)) for _, p in got] == \
        [(p.device, p.phase, p.seq, bytes(p.data)) for p in pieces]  # fmt: skip


@pytest.mark.parametrize("where", ["header", "chunk header", "data"])
def test_issue17_3_a_damaged_device_record_is_a_checksum_mismatch(where: str) -> None:
    raw = bytearray(wire(ChannelWriter(0, PS).device(1, 7, chunks(1)[0])))
    raw[{"header": 12, "chunk header": HEADER_SIZE + 7, "data": -1}[where]] ^= 0x01
    reader = ChannelReader(0, 16, PS)
    with pytest.raises((ChecksumMismatch, MalformedRecord)):
        ev = reader.header(bytes(raw[:HEADER_SIZE]))
        assert isinstance(ev, Device)
        reader.device_payload(bytes(raw[HEADER_SIZE:]))


def test_issue17_3_only_stop_copy_data_travels_on_channels() -> None:
    pre = DeviceData("nic0", DevicePhase.PRE_COPY, 0, b"x")
    raw = wire(ChannelWriter(0, PS).device(1, 0, pre))
    reader = ChannelReader(0, 16, PS)
    ev = reader.header(raw[:HEADER_SIZE])
    with pytest.raises(MalformedRecord, match="only stop-copy"):
        reader.device_payload(raw[HEADER_SIZE:])
    assert isinstance(ev, Device)


def test_issue17_3_device_record_limits() -> None:
    with pytest.raises(StreamUsageError):
        ChannelWriter(0, PS).device(1, 0, DeviceData("", DevicePhase.STOP_COPY, 0, b"x"))
    reader = ChannelReader(0, 16, PS)
    raw = wire(ChannelWriter(0, PS).device(1, 0, chunks(1)[0]))
    ev = reader.header(raw[:HEADER_SIZE])
    with pytest.raises(StreamUsageError):  # a header before the payload was taken
        reader.header(raw[:HEADER_SIZE])
    with pytest.raises(StreamUsageError):
        reader.device_payload(raw[HEADER_SIZE:-1])
    assert isinstance(ev, Device)


def test_issue17_3_reassembler_refuses_duplicates_and_reports_gaps() -> None:
    r = DeviceReassembler(max_queued=250)
    p = chunks(4)
    assert r.offer(1, p[1]) == []
    assert r.offer(0, p[0]) == [p[0], p[1]]
    with pytest.raises(MalformedRecord, match="twice"):
        r.offer(1, p[1])
    assert r.offer(3, p[3]) == []
    with pytest.raises(MalformedRecord, match="never arrived"):
        r.check_complete()
    with pytest.raises(MalformedRecord, match="wait for chunk #2"):
        r.offer(4, DeviceData("nic0", DevicePhase.STOP_COPY, 9, bytes(200)))
    assert r.offer(2, p[2]) == [p[2], p[3]]
    r.check_complete()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 40), st.randoms(use_true_random=False))
def test_issue17_3_any_arrival_order_loads_in_read_order(channels: int, n: int,
                                                         rnd: object) -> None:  # fmt: skip
    """Chunks dealt to the channels, each channel in order, the channels interleaved
    at random: the reassembler hands every chunk over exactly once, in read order."""
    pieces = chunks(n)
    queues = [list(q) for q in deal_device(pieces, channels)]
    r = DeviceReassembler()
    out: list[DeviceData] = []
    while any(queues):
        q = rnd.choice([q for q in queues if q])  # type: ignore[attr-defined]
        index, piece = q.pop(0)
        out += r.offer(index, piece)
    r.check_complete()
    assert out == pieces
