"""Issue 17 item 5: pass 1's pages sent from live guest memory (no snapshot copy) over
real data channels (sockets, both sessions in process): a record the guest tears between
its checksum and the kernel's copy is reported by the destination (OWED) and sent again,
and the migration verifies; a withheld or lost report, or a hostile one, fails the
migration before the stop with a typed error; a destination of channel protocol 1.2 gets
the records it always got."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import xxhash
from tests.unit.host.test_channel_workers import hosts  # noqa: F401 (fixture)
from tests.unit.host.test_issue17_switchover_ack import migrate

from vmferry.clock import ManualClock
from vmferry.errors import ChecksumMismatch, MalformedRecord, PeerError
from vmferry.host import datachannels
from vmferry.host.daemon import HostDaemon
from vmferry.host.datachannels import ChannelGroup, ChannelSink, dial_channels
from vmferry.host.migration import destination as destination_mod
from vmferry.host.migration.source import SourceWorker
from vmferry.machine import create_vm
from vmferry.machine.vm import VM
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import transfer
from vmferry.migration.multichannel import (
    HEAD,
    HEADER_SIZE,
    LIVE,
    LIVE_RECORD_BYTES,
    ChannelRecord,
    ChannelWriter,
    owed_report,
)
from vmferry.migration.source import MigrationParams, SourceSession

PS = 4096
TOKEN = "0123456789abcdef0123456789abcdef"
MIB = 16  # four 4 MiB runs, each cut into LIVE records of LIVE_RECORD_BYTES
#: pages of one LIVE record
REC = LIVE_RECORD_BYTES // PS


@dataclass
class Migration:
    vm: VM
    dst_vm: VM
    src: SourceSession
    dst: DestinationSession
    sink: ChannelSink
    group: ChannelGroup
    before: str
    clock: ManualClock

    def run(self) -> None:
        """Pre-copy through END, the channels' last bytes, LOADED, verification, COMMIT:
        as the host daemon's workers run them."""
        transfer(self.src, self.dst, self.clock)
        self.group.wait_done(30, lambda: None)
        ack = self.dst.finish(start=False)
        self.src.loaded()
        report = self.src.verification(ack)
        assert report["requested"] and report["commit_allowed"], report
        ack["post_load"] = self.dst.resume()
        self.src.complete(ack)


@pytest.fixture
def migration() -> Iterator[Callable[..., Migration]]:
    made: list[Migration] = []

    def make(*, live_src: bool = True, live_dst: bool = True) -> Migration:
        definition = {"name": "m", "memory_mib": MIB, "vcpus": 1, "fill": "random"}
        vm = create_vm(definition)
        vm.start()
        dst_vm = create_vm({**definition, "fill": "zero"})
        clock = ManualClock(1.0)
        src = SourceSession(vm, MigrationParams(verify=True), clock)
        dst = DestinationSession(clock, verify=True, factory=lambda cfg: dst_vm)
        group = ChannelGroup(TOKEN, dst_vm.ram, "127.0.0.1", live=live_dst)
        socks = dial_channels(("127.0.0.1", group.port), TOKEN, 2, None)
        sink = ChannelSink(socks, src, on_stall=lambda s: None, check=lambda: None,
                           live=live_src)  # fmt: skip
        src.ram_sink = sink
        m = Migration(vm, dst_vm, src, dst, sink, group, vm.ram.digest(), clock)
        made.append(m)
        return m

    yield make
    for m in made:
        m.sink.close()
        m.group.close()


def headers(bufs: list[Any]) -> Iterator[bytes]:
    for b in bufs:
        raw = bytes(memoryview(b)[:HEADER_SIZE]) if memoryview(b).nbytes == HEADER_SIZE \
            else b""  # fmt: skip
        if raw and raw[0] in (ChannelRecord.PAGES, ChannelRecord.ZERO, ChannelRecord.SYNC):
            yield raw


def spy(monkeypatch: pytest.MonkeyPatch, before_send: Callable[[list[Any]], None]) -> None:
    real = datachannels.send_buffers

    def send_buffers(sock: socket.socket, bufs: list[Any], on_stall: Any = None) -> int:
        before_send(bufs)
        return real(sock, bufs, on_stall)

    monkeypatch.setattr(datachannels, "send_buffers", send_buffers)


def test_issue17_5_a_torn_record_is_sent_again_and_the_migration_verifies(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch
) -> None:
    m = migration()
    torn: list[tuple[int, int]] = []
    flags: list[tuple[int, int]] = []
    lock = threading.Lock()

    def tear(bufs: list[Any]) -> None:
        """Before the kernel copies the first LIVE record (its checksum is taken), the
        guest writes one of its pages -- a vCPU write, which the dirty log sees."""
        for head in headers(bufs):
            kind, fl, _, number, first, count, _ = HEAD.unpack(head[: HEAD.size])
            with lock:
                if kind == ChannelRecord.PAGES:
                    flags.append((number, fl))
                if kind == ChannelRecord.PAGES and fl & LIVE and not torn:
                    torn.append((first, count))
                    m.vm.ram.write((first + 1) * PS + 8, b"\x5a" * 64)

    spy(monkeypatch, tear)
    m.run()
    assert m.src.stats.status is Status.COMPLETED
    ((first, count),) = torn
    assert count > 1
    assert m.sink.torn_records == 1 and m.sink.live_records == MIB * 256 // REC
    # the destination kept the torn data, owed the record's pages, and every one of them
    # came again in a verified record: none is owed at the end
    assert (m.group.owed.total, m.group.owed.count) == (count, 0)
    assert m.dst_vm.ram.read((first + 1) * PS + 8, 64) == b"\x5a" * 64
    assert m.dst_vm.ram.digest() == m.vm.ram.digest() != m.before
    # pass 1 went LIVE; the final pass (the guest paused) carried no LIVE record
    assert {fl for n, fl in flags if n == 1} == {LIVE}
    assert {fl for n, fl in flags if n > 1} == {0}
    assert m.src.stats.passes[0].normal == MIB * 256


@pytest.mark.parametrize("how", ["withheld", "lost"])
def test_issue17_5_a_missing_owed_report_fails_before_the_stop(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The destination never reports pass 1 (it keeps quiet, or its side of the channel
    closes instead): the source fails in pass 1 with a typed error, its guest never
    stopped and intact, nothing committed."""
    monkeypatch.setattr(datachannels, "REPORT_TIMEOUT_S", 0.5)

    def report(self: ChannelGroup, conn: socket.socket, raw: bytes) -> None:
        if how == "lost":
            conn.shutdown(socket.SHUT_WR)

    monkeypatch.setattr(ChannelGroup, "_report", report)
    m = migration()
    pauses: list[bool] = []
    monkeypatch.setattr(m.src.guest, "pause", lambda: pauses.append(True))
    with pytest.raises(PeerError, match="OWED report of pass 1") as err:
        m.run()
    assert err.value.step == "ram pass 1"
    m.src.fail(err.value.step, err.value.reason)
    assert pauses == [] and m.vm.running
    assert m.src.stats.status is Status.FAILED
    assert m.vm.ram.digest() == m.before
    assert m.dst.vm is None or not m.dst.vm.running


def hostile(npages: int) -> dict[str, Callable[[int, bytes], bytes]]:
    """Reports a destination could send after pass 1 on channel ``i`` (``raw``: the
    honest one)."""
    return {
        "out of range": lambda i, raw: owed_report(i, 1, PS, [(npages - 2, REC)]),
        "another pass": lambda i, raw: owed_report(i, 7, PS, []),
        "damaged": lambda i, raw: raw[:-1] + bytes([raw[-1] ^ 1]) if len(raw) > HEADER_SIZE
        else raw[:HEADER_SIZE - 1] + bytes([raw[HEADER_SIZE - 1] ^ 1]),
        "too many": lambda i, raw: owed_report(i, 1, PS, [(0, REC)] * (MIB * 256 // REC + 1)),
        "not a record": lambda i, raw: owed_report(i, 1, PS, [(1, REC)]),
        # a record it verified, said torn: the guest wrote none of its pages
        "untorn": lambda i, raw: owed_report(i, 1, PS, [(1024 * i, REC)]),
        "a SYNC": lambda i, raw: ChannelWriter(i, PS).sync(1),
    }


@pytest.mark.parametrize("kind", list(hostile(0)))
def test_issue17_5_hostile_owed_reports_fail_the_source_typed(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    m = migration()
    forge = hostile(m.vm.ram.npages)[kind]

    def report(self: ChannelGroup, conn: socket.socket, raw: bytes) -> None:
        i = raw[2] * 256 + raw[3]
        conn.sendall(forge(i, raw))

    monkeypatch.setattr(ChannelGroup, "_report", report)
    pauses: list[bool] = []
    monkeypatch.setattr(m.src.guest, "pause", lambda: pauses.append(True))
    with pytest.raises((MalformedRecord, ChecksumMismatch)) as err:
        m.run()
    expected = ChecksumMismatch if kind in ("damaged", "untorn") else MalformedRecord
    assert type(err.value) is expected, err.value
    # the session failed in pass 1, the guest never stopped and is intact
    assert m.src.stats.status is Status.FAILED and m.src.stats.error_step == "ram pass 1"
    assert pauses == [] and m.vm.running and m.vm.ram.digest() == m.before


def test_issue17_5_hostile_forward_records_fail_the_destination(
    migration: Callable[..., Migration],
) -> None:
    """A LIVE record in the final pass, or sent to a destination that did not negotiate
    them: the channel group fails with a typed reason and is never done."""
    for live_dst, final, word in [(True, True, "LIVE records in the final pass"),
                                  (False, False, "did not negotiate")]:  # fmt: skip
        m = migration(live_dst=live_dst)
        ram = m.vm.ram
        w0, w1 = ChannelWriter(0, PS), ChannelWriter(1, PS)
        for sock, w in zip(m.sink.socks, (w0, w1), strict=True):
            bufs = [*w.pages(1, 0, ram.view(0, 4 * PS), live=True), w.sync(1, final=final)]
            with contextlib.suppress(OSError):  # the group may fail the other one first
                for b in bufs:
                    sock.sendall(b)
        with pytest.raises(PeerError, match=word):
            m.group.wait_done(10, lambda: None)
        assert "MalformedRecord" in m.group.error and not m.group.done.is_set()


def channel_bytes(**kw: Any) -> list[str]:
    """Pass 1 (all of RAM, the guest running) and a final pass of three pages through a
    ChannelSink over socket pairs: the xxh3 of each channel's bytes as sent."""
    vm = create_vm({"name": "m", "memory_mib": MIB, "vcpus": 1, "fill": "random"})
    vm.start()
    src = SourceSession(vm, MigrationParams(), ManualClock())
    pairs = [socket.socketpair() for _ in range(2)]
    sink = ChannelSink([a for a, _ in pairs], src, on_stall=lambda s: None,
                       check=lambda: None, **kw)  # fmt: skip
    sent = [bytearray(), bytearray()]
    readers = [threading.Thread(target=_drain, args=(b, out), daemon=True)
               for (_, b), out in zip(pairs, sent, strict=True)]  # fmt: skip
    for t in readers:
        t.start()
    vm.ram.start_dirty_log()
    sink.send_pass(1, np.ones(vm.ram.npages, dtype=np.bool_), False)
    tail = np.zeros(vm.ram.npages, dtype=np.bool_)
    tail[[5, 6, 4000]] = True
    sink.send_pass(2, tail, True)
    sink.close()
    for t in readers:
        t.join(30)
    for _, b in pairs:
        b.close()
    return [xxhash.xxh3_64(bytes(s)).hexdigest() for s in sent]


def _drain(conn: socket.socket, out: bytearray) -> None:
    buf = bytearray(1 << 20)
    while True:
        try:
            n = conn.recv_into(buf)
        except OSError:
            return
        if not n:
            return
        out += buf[:n]


#: each channel's bytes for :func:`channel_bytes` as the sender sent them before LIVE
#: records existed (channel protocol 1.2; measured on the code of that version)
BEFORE = ["ac116bf4a5722d40", "e56bfb2a8eaa5d46"]


def test_issue17_5_a_channel_1_2_destination_gets_the_bytes_it_always_got() -> None:
    assert channel_bytes(live=False) == BEFORE


@pytest.mark.parametrize("minor", [2, 3])
def test_issue17_5_the_source_sends_live_records_only_to_a_channel_1_3_destination(
    hosts: tuple[HostDaemon, HostDaemon], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    minor: int,
) -> None:
    """The source decides from the destination's WELCOME (its minor version) whether its
    data channels send LIVE records; a 1.2 destination migrates as before."""
    real = destination_mod.Welcome
    monkeypatch.setattr(destination_mod, "Welcome", lambda host: real(host, minor=minor))
    seen: list[bool] = []
    opened = SourceWorker._open_channels

    def open_channels(self: SourceWorker) -> None:
        seen.append(self._live_pages())
        opened(self)

    monkeypatch.setattr(SourceWorker, "_open_channels", open_channels)
    a, b = hosts
    src, _, _ = migrate(a, b)
    assert src.status == "completed", src.error
    assert seen == [minor >= 3]
