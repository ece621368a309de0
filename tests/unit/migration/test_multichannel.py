"""Issue 17 item 1: the parallel data channels' wire format, checks and a whole migration
with RAM over several channels (sans-IO)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.clock import ManualClock
from vmferry.errors import ChecksumMismatch, MalformedRecord, StreamUsageError
from vmferry.machine import create_vm
from vmferry.machine.ram import GuestRam
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import migrate_locally
from vmferry.migration.multichannel import (
    HEADER_SIZE,
    ChannelReader,
    ChannelWriter,
    Pages,
    RunCounts,
    Sync,
    Zero,
    deal_runs,
    encode_runs,
)
from vmferry.migration.runs import page_runs
from vmferry.migration.source import MigrationParams, SourceSession

PS = 4096


def wire(bufs: list[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def apply(reader: ChannelReader, data: bytes, ram: GuestRam) -> list[object]:
    """Feed a channel's bytes to ``reader``, storing page data into ``ram``."""
    events: list[object] = []
    pos = 0
    while pos < len(data):
        ev = reader.header(data[pos : pos + HEADER_SIZE])
        pos += HEADER_SIZE
        if isinstance(ev, Pages):
            n = ev.count * PS
            view = ram.receive_view(ev.first, ev.count)
            view[:] = data[pos : pos + n]
            pos += n
            reader.payload(view)
            ram.received(ev.first, ev.count)
        elif isinstance(ev, Zero):
            ram.zero_pages(ev.first, ev.count)
        events.append(ev)
    return events


def test_issue17_item1_records_round_trip() -> None:
    src, dst = GuestRam(64 * PS), GuestRam(64 * PS)
    src.write(0, np.random.default_rng(1).bytes(8 * PS))
    w = ChannelWriter(2, PS)
    data = wire([*w.pages(1, 0, src.view(0, 8 * PS)), w.zero(1, 8, 56), w.sync(1),
                 *w.pages(2, 3, src.view(3 * PS, PS)), w.sync(2, final=True)])
    assert len(data) == w.bytes_out
    r = ChannelReader(2, 64, PS)
    events = apply(r, data, dst)
    assert events == [Pages(0, 8), Zero(8, 56), Sync(1, False), Pages(3, 1), Sync(2, True)]
    assert dst.read(0, 64 * PS) == src.read(0, 64 * PS)
    assert (r.pages_received, r.zero_pages_received, r.finished) == (9, 56, True)
    with pytest.raises(StreamUsageError):
        w.zero(3, 0, 1)  # nothing after the final SYNC


def test_issue17_item1_damaged_payload_is_refused() -> None:
    src, dst = GuestRam(16 * PS), GuestRam(16 * PS)
    src.write(0, b"\x01" * 4 * PS)
    data = bytearray(wire(ChannelWriter(0, PS).pages(1, 0, src.view(0, 4 * PS))))
    data[HEADER_SIZE + 100] ^= 0xFF
    with pytest.raises(ChecksumMismatch, match="RAM_PAGES"):
        apply(ChannelReader(0, 16, PS), bytes(data), dst)


@pytest.mark.parametrize("offset", range(0, 24, 3))
def test_issue17_item1_damaged_header_is_refused(offset: int) -> None:
    """The checksum covers the header too: a page number changed in flight must not put
    good data in the wrong place."""
    data = bytearray(ChannelWriter(0, PS).zero(1, 4, 2))
    data[offset] ^= 0x01
    with pytest.raises((ChecksumMismatch, MalformedRecord)):
        ChannelReader(0, 16, PS).header(bytes(data))


def test_issue17_item1_reader_refuses_what_is_out_of_place() -> None:
    w = ChannelWriter(0, PS)
    with pytest.raises(MalformedRecord, match="pass 2 during pass 1"):
        ChannelReader(0, 16, PS).header(w.zero(2, 0, 1))
    with pytest.raises(MalformedRecord, match="says channel 0"):
        ChannelReader(1, 16, PS).header(w.zero(1, 0, 1))
    with pytest.raises(MalformedRecord, match="outside guest RAM"):
        ChannelReader(0, 16, PS).header(w.zero(1, 10, 7))
    with pytest.raises(MalformedRecord, match="page size"):
        ChannelReader(0, 16, 2 * PS).header(w.zero(1, 0, 1))
    r = ChannelReader(0, 16, PS)
    r.header(w.sync(1, final=True))
    with pytest.raises(MalformedRecord, match="after the final SYNC"):
        r.header(ChannelWriter(0, PS).zero(1, 0, 1))
    bad = bytearray(ChannelWriter(0, PS).zero(1, 0, 1))
    bad[0] = 9
    with pytest.raises(MalformedRecord, match="unknown record type"):
        ChannelReader(0, 16, PS).header(bytes(bad))


def test_issue17_item1_encode_runs_finds_zero_pages_and_snapshots() -> None:
    ram = GuestRam(32 * PS)
    ram.write(2 * PS, b"\x07" * 3 * PS)  # pages 2-4 live, the rest zero
    bounce = np.empty(8 * PS, dtype=np.uint8)
    counts = RunCounts()
    w = ChannelWriter(0, PS)
    batches = list(encode_runs(w, ram, 1, [(0, 16), (20, 4)], bounce, counts,
                               batch_bytes=PS))
    ram.write(2 * PS, b"\x09" * PS)  # the guest writes after the snapshot was taken
    dst = GuestRam(32 * PS)
    events = apply(ChannelReader(0, 32, PS), b"".join(wire(b) for b in batches), dst)
    assert events == [Zero(0, 2), Pages(2, 3), Zero(5, 11), Zero(20, 4)]
    assert (counts.normal, counts.zero) == (3, 17)
    assert dst.read(2 * PS, 3 * PS) == b"\x07" * 3 * PS  # the snapshot, checksum intact


@given(st.lists(st.integers(0, 299), max_size=120), st.integers(1, 5))
@settings(max_examples=40, deadline=None)
def test_issue17_item1_dealing_covers_every_page_once(pages: list[int], n: int) -> None:
    index = np.array(sorted(set(pages)), dtype=np.int64)
    starts, lengths = page_runs(index, 7)
    dealt = deal_runs(starts, lengths, n)
    got = sorted(p for runs in dealt for s, c in runs for p in range(s, s + c))
    assert got == index.tolist()
    sizes = [len(r) for r in dealt]
    assert max(sizes) - min(sizes) <= 1  # round-robin: every channel near the same place


class LocalSink:
    """RAM over ``n`` channels into the destination session's VM, in process."""

    def __init__(self, src: SourceSession, dst: DestinationSession, n: int) -> None:
        self.src, self.dst = src, dst
        self.writers = [ChannelWriter(i, PS) for i in range(n)]
        self.readers: list[ChannelReader] = []
        self.bounce = np.empty(64 * PS, dtype=np.uint8)
        self.passes: list[int] = []

    def send_pass(self, number: int, mask: npt.NDArray[np.bool_], final: bool) -> RunCounts:
        assert self.dst.vm is not None
        ram = self.dst.vm.ram
        if not self.readers:
            self.readers = [ChannelReader(i, ram.npages, PS) for i in range(len(self.writers))]
        starts, lengths = page_runs(np.flatnonzero(mask), 16)
        total = RunCounts()
        for i, runs in enumerate(deal_runs(starts, lengths, len(self.writers))):
            counts = RunCounts()
            for batch in encode_runs(self.writers[i], self.src.vm.ram, number, runs,
                                     self.bounce, counts, batch_bytes=16 * PS,
                                     snapshot=not final):
                data = wire(batch)
                self.src.channel_bytes += len(data)
                apply(self.readers[i], data, ram)
            sync = self.writers[i].sync(number, final=final)
            self.src.channel_bytes += len(sync)
            apply(self.readers[i], sync, ram)
            total.add(counts)
        self.passes.append(number)
        return total


@pytest.mark.parametrize("channels", [1, 3])
def test_issue17_item1_whole_migration_over_channels(channels: int) -> None:
    vm = create_vm({"name": "m", "memory_mib": 8, "vcpus": 2, "fill": "random",
                    "workload": {"dirty_rate_mbps": 40, "pattern": "hot"}})
    vm.start()
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(downtime_limit_ms=20, verify=True), clock)
    dst = DestinationSession(clock, verify=True)
    sink = LocalSink(src, dst, channels)
    src.ram_sink = sink
    migrate_locally(src, dst, clock, link_bytes_per_s=50e6, on_time=vm.run_slice)
    assert src.stats.status is Status.COMPLETED
    assert len(sink.passes) >= 2 and all(r.finished for r in sink.readers)
    assert src.verification({"digests": {}})["requested"]
    assert dst.vm is not None and dst.vm.ram.digest() == vm.ram.digest()
    assert src.stats.ram_normal == sum(r.pages_received for r in sink.readers)
    # the channels' bytes count as the passes' bytes (bandwidth, pacing)
    assert sum(p.bytes for p in src.stats.passes) > vm.ram.size
