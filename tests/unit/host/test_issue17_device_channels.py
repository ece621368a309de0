"""Issue 17, item 3: the destination's data channel threads take device state in the
final pass (socket pairs, no daemon): chunks from several channels are loaded in read
order; a cut or a damaged chunk fails the group with a typed reason."""

from __future__ import annotations

import pytest
from tests.unit.host.test_datachannels import PS, group_of, send, until

from vmferry.errors import MalformedRecord
from vmferry.machine.handlers import DeviceData, DevicePhase
from vmferry.machine.ram import GuestRam
from vmferry.migration.multichannel import ChannelWriter, deal_device, device_records


def pieces(n: int) -> list[DeviceData]:
    out = [DeviceData("nic0", DevicePhase.STOP_COPY, k, bytes([k + 1]) * 3000)
           for k in range(n)]  # fmt: skip
    return [*out, DeviceData("nic0", DevicePhase.DONE, n, b"")]


def test_issue17_3_device_chunks_from_two_channels_load_in_order() -> None:
    ram = GuestRam(16 * PS)
    group, (c0, c1) = group_of(2, ram)
    loaded: list[tuple[int, bytes]] = []
    group.on_device = lambda p: loaded.append((p.seq, bytes(p.data)))
    chunks = pieces(5)
    d0, d1 = deal_device(chunks, 2)
    w0, w1 = ChannelWriter(0, PS), ChannelWriter(1, PS)
    # channel 1 delivers all of its chunks (and its final SYNC) before channel 0 starts
    send(c1, [*device_records(w1, 1, d1), w1.sync(1, final=True)])
    until(lambda: group.reassembler.queued_bytes > 0, "channel 1's chunks wait")
    assert loaded == []  # chunk #0 is on channel 0: nothing may load before it
    group.open_device()  # the main stream ended: what is next in order may load
    assert loaded == []
    send(c0, [*device_records(w0, 1, d0), w0.sync(1, final=True)])
    group.wait_done(10, lambda: None)
    assert loaded == [(p.seq, bytes(p.data)) for p in chunks]
    group.close()


def test_issue17_3_no_device_chunk_loads_before_the_main_stream_ended() -> None:
    """The main stream's pre-copy chunks of a device come before its stop-copy chunks and
    are loaded by another thread: a channel never loads into a device before that thread
    is done with it (found by the benchmark: a lock-order Deadlock report)."""
    ram = GuestRam(16 * PS)
    group, (c0,) = group_of(1, ram)
    loaded: list[int] = []
    group.on_device = lambda p: loaded.append(p.seq)
    w0 = ChannelWriter(0, PS)
    send(c0, [*device_records(w0, 1, list(enumerate(pieces(3)))), w0.sync(1, final=True)])
    group.wait_done(10, lambda: None)  # every chunk is here and in order ...
    assert loaded == []  # ... and waits
    group.open_device()
    assert loaded == [0, 1, 2, 3]
    group.close()


def test_issue17_3_a_cut_channel_during_device_state_fails_the_group() -> None:
    ram = GuestRam(16 * PS)
    group, (c0, c1) = group_of(2, ram)
    group.on_device = lambda p: None
    d0, d1 = deal_device(pieces(6), 2)
    w0, w1 = ChannelWriter(0, PS), ChannelWriter(1, PS)
    send(c1, [*device_records(w1, 1, d1), w1.sync(1, final=True)])
    raw = b"".join(bytes(b) for b in device_records(w0, 1, d0))
    c0.sendall(raw[: len(raw) // 2])  # cut inside a chunk
    c0.close()
    until(lambda: bool(group.error), "the group fails")
    assert "data channel 0" in group.error
    with pytest.raises(Exception, match="data channel 0"):
        group.wait_done(5, lambda: None)
    group.close()
    assert not any(t.is_alive() for t in group.threads)


def test_issue17_3_a_damaged_device_chunk_fails_the_group() -> None:
    ram = GuestRam(16 * PS)
    group, (c0,) = group_of(1, ram)
    group.on_device = lambda p: None
    bufs = ChannelWriter(0, PS).device(1, 0, pieces(1)[0])
    send(c0, [bufs[0], b"\xee" * len(bytes(bufs[1]))])
    until(lambda: bool(group.error), "the group fails")
    assert "ChecksumMismatch" in group.error
    group.close()


def test_issue17_3_device_state_where_none_is_expected_fails() -> None:
    """A migration whose destination did not ask for device state on the channels (no
    loader): a DEVICE record is refused, not dropped."""
    ram = GuestRam(16 * PS)
    group, (c0,) = group_of(1, ram)
    send(c0, ChannelWriter(0, PS).device(1, 0, pieces(1)[0]))
    until(lambda: bool(group.error), "the group fails")
    assert "MalformedRecord" in group.error and "takes none" in group.error
    group.close()


def test_issue17_3_a_gap_in_the_device_chunks_is_reported() -> None:
    ram = GuestRam(16 * PS)
    group, (c0,) = group_of(1, ram)
    group.on_device = lambda p: None
    chunks = pieces(3)
    w0 = ChannelWriter(0, PS)
    send(c0, [*device_records(w0, 1, [(0, chunks[0]), (2, chunks[2])]),
              w0.sync(1, final=True)])  # fmt: skip
    with pytest.raises(MalformedRecord, match="#1 never arrived"):
        group.wait_done(10, lambda: None)
    group.close()
