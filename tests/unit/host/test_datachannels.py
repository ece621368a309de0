"""Issue 17 item 1: the destination's data channel threads (socket pairs, no daemon)."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from vmferry.errors import PeerError
from vmferry.host.datachannels import ChannelGroup, dial_channels
from vmferry.host.faults import Fault
from vmferry.machine.ram import GuestRam
from vmferry.migration.multichannel import ChannelWriter

PS = 4096


def until(cond: object, what: str) -> None:
    """Wait for a condition another thread makes true (bounded, not a timing check)."""
    end = time.monotonic() + 10
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, what
        time.sleep(0.005)


TOKEN = "0123456789abcdef0123456789abcdef"


def group_of(n: int, ram: GuestRam) -> tuple[ChannelGroup, list[socket.socket]]:
    group = ChannelGroup(TOKEN, ram, "127.0.0.1")
    return group, dial_channels(("127.0.0.1", group.port), TOKEN, n, None)


def send(sock: socket.socket, bufs: list[bytes | memoryview]) -> None:
    for b in bufs:
        sock.sendall(b)


def test_issue17_item1_newer_copy_wins_across_channels() -> None:
    """Page 5 goes in pass 1 on channel 0 and in pass 2 on channel 1.  Channel 1's bytes
    all arrive first; without the per-pass barrier its reader would store the pass-2
    copy before channel 0's pass-1 copy overwrote it."""
    ram = GuestRam(16 * PS)
    group, (c0, c1) = group_of(2, ram)
    w0, w1 = ChannelWriter(0, PS), ChannelWriter(1, PS)
    old, new = b"\x01" * PS, b"\x02" * PS
    send(c1, [w1.sync(1), *w1.pages(2, 5, new), w1.sync(2, final=True)])
    until(lambda: group.barrier is not None and group.barrier.n_waiting == 1,
          "channel 1 waits at the pass-1 barrier")
    assert ram.read(5 * PS, PS) == bytes(PS)  # nothing of pass 2 applied yet
    send(c0, [*w0.pages(1, 5, old), w0.sync(1), w0.sync(2, final=True)])
    group.wait_done(10, lambda: None)
    assert ram.read(5 * PS, PS) == new
    assert group.totals() == (2, 0)
    group.close()


def test_issue17_item1_a_cut_channel_fails_the_group() -> None:
    ram = GuestRam(16 * PS)
    group, (c0, c1) = group_of(2, ram)
    w1 = ChannelWriter(1, PS)
    send(c1, [w1.sync(1)])  # channel 1 waits at the barrier for channel 0 ...
    until(lambda: group.barrier is not None and group.barrier.n_waiting == 1,
          "channel 1 at the barrier")
    c0.close()  # ... which is cut
    until(lambda: bool(group.error), "the group fails")
    assert "data channel 0" in group.error
    with pytest.raises(Exception, match="data channel 0"):
        group.wait_done(5, lambda: None)
    group.close()  # joins every thread (they must stop before the RAM goes)
    assert not any(t.is_alive() for t in group.threads)


def test_issue17_item1_a_damaged_record_fails_the_group() -> None:
    ram = GuestRam(16 * PS)
    group, (c0,) = group_of(1, ram)
    bufs = ChannelWriter(0, PS).pages(1, 2, b"\x05" * PS)
    send(c0, [bufs[0], b"\x06" * PS])
    until(lambda: bool(group.error), "the group fails")
    assert "ChecksumMismatch" in group.error
    group.close()


def test_issue17_item1_channel_hellos_are_checked() -> None:
    ram = GuestRam(16 * PS)
    group = ChannelGroup(TOKEN, ram, "127.0.0.1")
    with pytest.raises(PeerError):  # another migration's token: refused, closed
        dial_channels(("127.0.0.1", group.port), "f" * 32, 2, None)
    c0, _c1 = dial_channels(("127.0.0.1", group.port), TOKEN, 2, None)
    assert "already connected" in group.attach(TOKEN, 0, 2, c0)
    assert "the others said 2" in group.attach(TOKEN, 1, 3, c0)
    assert group.count == 2 and not group.error
    group.close()
    assert not any(t.is_alive() for t in group.threads)


def test_issue17_item1_scatter_records_cross_the_sockets() -> None:
    """Pass 1 sends pages 0-15 as a run on channel 0; pass 2 sends scattered pages (some
    now zero) as SCATTER lists on channel 1, whose bytes arrive first: the barrier holds
    them, and the pass-2 copies win."""
    src, ram = GuestRam(16 * PS), GuestRam(16 * PS)
    src.write(0, b"\x01" * 16 * PS)
    group, (c0, c1) = group_of(2, ram)
    w0, w1 = ChannelWriter(0, PS), ChannelWriter(1, PS)
    src.write(3 * PS, b"\x02" * PS)
    src.write(9 * PS, b"\x03" * PS)
    live = np.array([3, 9], np.int64)
    snap = np.empty((2, PS), np.uint8)
    src.gather(live, snap)
    send(c1, [w1.sync(1), *w1.scatter(2, live, snap.data),
              *w1.scatter(2, np.array([5, 12], np.int64), None), w1.sync(2, final=True)])
    until(lambda: group.barrier is not None and group.barrier.n_waiting == 1,
          "channel 1 waits at the pass-1 barrier")
    send(c0, [*w0.pages(1, 0, src.view(0, 16 * PS)), w0.sync(1), w0.sync(2, final=True)])
    group.wait_done(10, lambda: None)
    assert ram.read(3 * PS, PS) == b"\x02" * PS and ram.read(9 * PS, PS) == b"\x03" * PS
    assert ram.read(5 * PS, PS) == bytes(PS) and ram.read(12 * PS, PS) == bytes(PS)
    assert ram.read(4 * PS, PS) == b"\x01" * PS
    assert group.totals() == (18, 2)
    group.close()


def test_issue17_item1_a_damaged_scatter_list_fails_the_group_and_stores_nothing() -> None:
    ram = GuestRam(16 * PS)
    group, (c0,) = group_of(1, ram)
    bufs = ChannelWriter(0, PS).scatter(1, np.array([2, 7], np.int64), b"\x05" * 2 * PS)
    send(c0, [bufs[0], bufs[1], b"\x05" * PS + b"\x06" * PS])
    until(lambda: bool(group.error), "the group fails")
    assert "ChecksumMismatch" in group.error
    group.close()
    assert not ram.populated.any()


def test_issue17_item1_cut_channel_fault_takes_a_pass() -> None:
    assert Fault.parse("cut-channel:1") == Fault("cut-channel", "1", 1)
    assert Fault.parse("cut-channel:1:3") == Fault("cut-channel", "1", 3)
    assert str(Fault.parse("cut-channel:1:3")) == "cut-channel:1:3"
    for bad in ("cut-channel:1:0", "cut-channel:1:x", "cut-channel:16"):
        with pytest.raises(Exception, match="cut-channel:N"):
            Fault.parse(bad)
