"""Issue 17 item 1: the parallel data channels' wire format, checks and a whole migration
with RAM over several channels (sans-IO)."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import numpy.typing as npt
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.clock import ManualClock
from vmferry.errors import ChecksumMismatch, MalformedRecord, StreamUsageError
from vmferry.machine import create_vm
from vmferry.machine.ram import GuestRam
from vmferry.migration.channelsend import (
    RunCounts,
    deal_runs,
    deal_scattered,
    encode_runs,
    encode_scatter,
    split_scattered,
)
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import migrate_locally
from vmferry.migration.multichannel import (
    HEAD,
    HEADER_SIZE,
    MAX_SCATTER_PAGES,
    SCATTER_BELOW,
    ZEROED,
    ChannelReader,
    ChannelRecord,
    ChannelWriter,
    Pages,
    Scatter,
    Sync,
    Zero,
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
        elif isinstance(ev, Scatter):
            pages = reader.scatter_index(data[pos : pos + 8 * ev.count])
            pos += 8 * ev.count
            if ev.zero:
                ram.zero_pages_at(pages)
            else:
                n = ev.count * PS
                staged = np.frombuffer(data[pos : pos + n], dtype=np.uint8)
                pos += n
                reader.payload(staged)
                ram.scatter_pages(pages, staged.reshape(ev.count, PS))
            events.append((ev, pages.tolist()))
            continue
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

    def __init__(self, src: SourceSession, dst: DestinationSession, n: int,
                 clock: ManualClock | None = None) -> None:  # fmt: skip
        self.src, self.dst, self.clock = src, dst, clock
        self.writers = [ChannelWriter(i, PS) for i in range(n)]
        self.readers: list[ChannelReader] = []
        self.bounce = np.empty(64 * PS, dtype=np.uint8)
        self.passes: list[int] = []

    def send_pass(self, number: int, mask: npt.NDArray[np.bool_], final: bool) -> RunCounts:
        assert self.dst.vm is not None
        ram = self.dst.vm.ram
        if not self.readers:
            self.readers = [ChannelReader(i, ram.npages, PS) for i in range(len(self.writers))]
        starts, lengths, scattered = split_scattered(np.flatnonzero(mask), 64)
        lists = deal_scattered(scattered, len(self.writers))
        total = RunCounts()
        for i, runs in enumerate(deal_runs(starts, lengths, len(self.writers))):
            counts = RunCounts()
            w, ram_src = self.writers[i], self.src.vm.ram
            # lazily: each batch is applied before the next reuses the bounce buffer
            batches = itertools.chain(
                encode_runs(w, ram_src, number, runs, self.bounce, counts,
                            batch_bytes=16 * PS, snapshot=not final),
                encode_scatter(w, ram_src, number, lists[i], self.bounce, counts,
                               batch_bytes=16 * PS))
            for batch in batches:
                data = wire(batch)
                self.src.channel_bytes += len(data)
                apply(self.readers[i], data, ram)
                if self.clock is not None and not final:  # the guest runs meanwhile
                    self.clock.advance(len(data) / 50e6)
                    self.src.vm.run_slice(len(data) / 50e6)
            sync = self.writers[i].sync(number, final=final)
            self.src.channel_bytes += len(sync)
            apply(self.readers[i], sync, ram)
            total.add(counts)
        self.passes.append(number)
        return total

    def owed_pages(self, dirty: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        return dirty  # no LIVE records: nothing is ever owed


@pytest.mark.parametrize("channels", [1, 3])
def test_issue17_item1_whole_migration_over_channels(channels: int) -> None:
    vm = create_vm({"name": "m", "memory_mib": 8, "vcpus": 2, "fill": "random",
                    "workload": {"dirty_rate_mbps": 40, "pattern": "uniform"}})
    vm.start()
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(downtime_limit_ms=20, verify=True), clock)
    dst = DestinationSession(clock, verify=True)
    sink = LocalSink(src, dst, channels, clock)
    src.ram_sink = sink
    migrate_locally(src, dst, clock, link_bytes_per_s=50e6, on_time=vm.run_slice)
    assert src.stats.status is Status.COMPLETED
    assert len(sink.passes) >= 2 and all(r.finished for r in sink.readers)
    assert src.verification({"digests": {}})["requested"]
    assert dst.vm is not None and dst.vm.ram.digest() == vm.ram.digest()
    assert src.stats.ram_normal == sum(r.pages_received for r in sink.readers)
    # the scattered dirty pages went as page lists
    assert sum(w.scatter_records for w in sink.writers) > 0
    # the channels' bytes count as the passes' bytes (bandwidth, pacing)
    assert sum(p.bytes for p in src.stats.passes) > vm.ram.size


# --- SCATTER: scattered pages in one record -------------------------------------------


def scatter_wire(ram: GuestRam, number: int, pages: list[int], channel: int = 0,
                 bounce_pages: int = 64) -> tuple[bytes, RunCounts]:  # fmt: skip
    w = ChannelWriter(channel, PS)
    counts = RunCounts()
    lists = [np.array(pages, dtype=np.int64)] if pages else []
    batches = encode_scatter(w, ram, number, lists, np.empty(bounce_pages * PS, np.uint8),
                             counts, batch_bytes=8 * PS)
    data = b"".join(wire(b) for b in batches)
    assert len(data) == w.bytes_out
    return data, counts


@given(st.sets(st.integers(0, 127), max_size=100), st.sets(st.integers(0, 127)),
       st.integers(1, 4), st.integers(1, 40))
@settings(max_examples=40, deadline=None)
def test_issue17_item1_scatter_records_round_trip(dirty: set[int], zero: set[int],
                                                  channels: int, bounce_pages: int
                                                  ) -> None:  # fmt: skip
    """Any set of pages, some all zero, dealt to any number of channels in SCATTER lists
    (whatever the staging buffer's size), lands exactly: every listed page as the
    source has it, no other page touched."""
    n = 128
    src, dst = GuestRam(n * PS), GuestRam(n * PS)
    src.write(0, np.random.default_rng(len(dirty)).integers(1, 255, n * PS, np.uint8))
    dst.write(0, b"\xee" * n * PS)
    for p in zero:
        src.zero_pages(p, 1)
    index = np.array(sorted(dirty), dtype=np.int64)
    total = RunCounts()
    for i, lists in enumerate(deal_scattered(index, channels)):
        w, counts = ChannelWriter(i, PS), RunCounts()
        data = b"".join(wire(b) for b in encode_scatter(
            w, src, 1, lists, np.empty(bounce_pages * PS, np.uint8), counts,
            batch_bytes=4 * PS))  # fmt: skip
        r = ChannelReader(i, n, PS)
        apply(r, data + w.sync(1, final=True), dst)
        assert (r.pages_received, r.zero_pages_received) == (counts.normal, counts.zero)
        total.add(counts)
    assert total.normal + total.zero == len(dirty)
    assert total.zero == len(dirty & zero)
    for p in range(n):
        want = src.read(p * PS, PS) if p in dirty else b"\xee" * PS
        assert dst.read(p * PS, PS) == want, p


@given(st.lists(st.integers(0, 2000), max_size=300), st.integers(1, 40))
@settings(max_examples=40, deadline=None)
def test_issue17_item1_split_scattered_covers_every_page_once(pages: list[int],
                                                              run_pages: int) -> None:
    index = np.array(sorted(set(pages)), dtype=np.int64)
    starts, lengths, scattered = split_scattered(index, run_pages)
    runs = [p for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)
            for p in range(s, s + n)]  # fmt: skip
    assert sorted(runs + scattered.tolist()) == index.tolist()
    assert bool((lengths >= SCATTER_BELOW).all())
    lists = deal_scattered(scattered, 3)
    assert [p for lst in lists for a in lst for p in a.tolist()] != [] or not scattered.size
    assert sorted(p for lst in lists for a in lst for p in a.tolist()) == scattered.tolist()
    assert all(0 < a.size <= MAX_SCATTER_PAGES for lst in lists for a in lst)


def test_issue17_item1_scatter_of_a_hot_set_is_cheaper_than_runs() -> None:
    """A thousand scattered dirty pages: one SCATTER record per list instead of a record
    (header, checksum, and on the wire a system call's worth of work) per page."""
    ram = GuestRam(4096 * PS)
    ram.write(0, np.random.default_rng(3).bytes(4096 * PS))
    pages = list(range(0, 4096, 4))
    data, counts = scatter_wire(ram, 1, pages)
    assert counts.normal == len(pages)
    w = ChannelWriter(0, PS)
    runs = b"".join(wire(b) for b in encode_runs(
        w, ram, 1, [(p, 1) for p in pages], np.empty(64 * PS, np.uint8), RunCounts(),
        batch_bytes=8 * PS))  # fmt: skip
    records = sum(1 for ev in apply(ChannelReader(0, 4096, PS), data, GuestRam(4096 * PS)))
    assert records <= len(pages) // 64 + 1  # a list per staging buffer's worth
    assert len(data) < len(runs)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_issue17_item1_damaged_scatter_record_is_refused(data: st.DataObject) -> None:
    """One flipped bit anywhere in a SCATTER record -- header, page list or data -- is
    refused with a typed error, and the reader never stores the data of a damaged list."""
    ram = GuestRam(64 * PS)
    ram.write(0, np.random.default_rng(5).bytes(64 * PS))
    zeroed = data.draw(st.booleans())
    if zeroed:
        ram.zero_pages(0, 64)
    rec, _ = scatter_wire(ram, 1, [1, 5, 9, 40])
    bit = data.draw(st.integers(0, 8 * len(rec) - 1))
    bad = bytearray(rec)
    bad[bit // 8] ^= 1 << (bit % 8)
    dst = GuestRam(64 * PS)
    # what follows on the wire (here: padding) is read as this record's data if the
    # damage says so, as a socket's reader would
    with pytest.raises((ChecksumMismatch, MalformedRecord)):
        apply(ChannelReader(0, 64, PS), bytes(bad) + bytes(8 * PS), dst)
    if bit // 8 >= HEADER_SIZE:  # the header passed: nothing of the list was stored
        assert not dst.populated.any()


def test_issue17_item1_scatter_reader_refuses_what_is_out_of_place() -> None:
    ram = GuestRam(64 * PS)
    ram.write(0, b"\x03" * 64 * PS)
    rec, _ = scatter_wire(ram, 2, [3, 4, 60])
    head = rec[:HEADER_SIZE]
    with pytest.raises(MalformedRecord, match="pass 2 during pass 1"):
        ChannelReader(0, 64, PS).header(head)
    with pytest.raises(MalformedRecord, match="says channel 0"):
        ChannelReader(1, 64, PS, first_pass=2).header(head)
    with pytest.raises(MalformedRecord, match="page size"):
        ChannelReader(0, 64, 2 * PS, first_pass=2).header(head)
    r = ChannelReader(0, 32, PS, first_pass=2)  # page 60 is beyond this VM's RAM
    assert r.header(head) == Scatter(3, False)
    with pytest.raises(MalformedRecord, match="outside guest RAM"):
        r.scatter_index(rec[HEADER_SIZE : HEADER_SIZE + 24])
    r = ChannelReader(0, 64, PS)
    r.header(ChannelWriter(0, PS).sync(1, final=True))
    with pytest.raises(MalformedRecord, match="after the final SYNC"):
        r.header(scatter_wire(ram, 1, [1])[0][:HEADER_SIZE])
    with pytest.raises(StreamUsageError, match="strictly increasing"):
        ChannelWriter(0, PS).scatter(1, np.array([4, 4], np.int64), None)
    with pytest.raises(StreamUsageError):
        ChannelWriter(0, PS).scatter(1, np.arange(MAX_SCATTER_PAGES + 1), None)
    with pytest.raises(StreamUsageError, match="bytes of data"):
        ChannelWriter(0, PS).scatter(1, np.array([1, 2], np.int64), b"\0" * PS)
    # a list that is not increasing, with a good checksum: still refused
    index = np.array([9, 3], dtype=">u8").tobytes()
    hd = HEAD.pack(ChannelRecord.SCATTER, ZEROED, 0, 1, 0, 2, PS)
    raw = hd + struct.pack(">Q", xxhash.xxh3_64_intdigest(hd + index))
    r = ChannelReader(0, 64, PS)
    assert r.header(raw) == Scatter(2, True)
    with pytest.raises(MalformedRecord, match="strictly increasing"):
        r.scatter_index(index)
    for flags, count, first, match in [(0x04, 2, 0, "unknown flags"),
                                       (0, MAX_SCATTER_PAGES + 1, 0, "SCATTER of"),
                                       (ZEROED, 0, 0, "SCATTER of 0"),
                                       (ZEROED, 2, 7, "first page")]:
        hd = HEAD.pack(ChannelRecord.SCATTER, flags, 0, 1, first, count, PS)
        with pytest.raises(MalformedRecord, match=match):
            ChannelReader(0, 64, PS).header(hd + bytes(8))
    r = ChannelReader(0, 64, PS, first_pass=2)
    r.header(head)
    with pytest.raises(StreamUsageError, match="still expected"):
        r.header(head)
