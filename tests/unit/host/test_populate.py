"""Issue 17 item 2: the destination's RAM is populated ahead of the stream.

Residency is read with mincore(2), so the tests see what the kernel faulted in without
touching (and so faulting) the pages themselves."""

from __future__ import annotations

import ctypes
import mmap
import time

import numpy as np
import pytest

from vmferry.host.populate import Populator, populate_write
from vmferry.machine.ram import GuestRam

MIB = 1024 * 1024
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident(ram: GuestRam) -> np.ndarray:
    vec = np.zeros(ram.npages, dtype=np.uint8)
    assert _libc.mincore(ram.address, ram.size, vec.ctypes.data) == 0
    return (vec & 1).astype(bool)


def settle(p: Populator, done_to: int) -> None:
    """Wait until the populator reached ``done_to`` (bounded; not a timing assertion)."""
    deadline = time.monotonic() + 30
    while p.done_to < done_to and p.running and time.monotonic() < deadline:
        time.sleep(0.001)


@pytest.fixture
def supported() -> None:
    probe = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = np.frombuffer(probe, dtype=np.uint8).ctypes.data
    if populate_write(addr, 4096) != 0:
        pytest.skip("kernel without MADV_POPULATE_WRITE")


def test_issue17_item2_guest_ram_is_4k_backed_and_tracks_frontier() -> None:
    ram = GuestRam(4 * MIB)
    assert not ram.huge_pages
    assert ram.write_frontier == 0
    ram.write_pages(10, np.ones((3, 4096), np.uint8))
    assert ram.write_frontier == 13
    ram.scatter_pages(np.array([5, 40], np.int64), np.ones((2, 4096), np.uint8))
    assert ram.write_frontier == 41
    ram.write_pages(0, np.ones((1, 4096), np.uint8))  # behind: the frontier stays
    assert ram.write_frontier == 41
    ram.close()


def test_issue17_item2_populates_a_window_ahead_not_beyond(supported: None) -> None:
    ram = GuestRam(64 * MIB)
    p = Populator(ram, ahead_bytes=8 * MIB, chunk_bytes=2 * MIB)
    try:
        time.sleep(0.05)  # some polls of the frontier
        assert p.populated_pages == 0  # nothing before the first page of data
        assert not resident(ram).any()
        ram.write_pages(0, np.ones((1, 4096), np.uint8))
        settle(p, 2049)
        assert p.error == ""
        res = resident(ram)
        assert res[:2049].all()  # 8 MiB past the frontier are there before the bytes
        assert not res[2049:].any()  # and nothing past the window
        # the receiver jumps ahead (e.g. zero runs): the populator follows the frontier
        ram.write_pages(8192, np.ones((1, 4096), np.uint8))
        settle(p, 8193 + 2048 - 1)
        res = resident(ram)
        assert res[8193 : 8193 + 2047].all()
        assert not res[2049:8192].any()  # what the receiver skipped is not populated
        assert not res[8193 + 2048 :].any()
        assert bytes(ram.read(4096, 4096)) == bytes(4096)  # contents untouched: still zero
    finally:
        p.stop()
        ram.close()


def test_issue17_item2_runs_to_the_end_and_stops(supported: None) -> None:
    ram = GuestRam(16 * MIB)
    p = Populator(ram, ahead_bytes=64 * MIB, chunk_bytes=4 * MIB)
    ram.write_pages(0, np.ones((1, 4096), np.uint8))
    settle(p, ram.npages)
    p.stop()
    assert p.populated_pages == ram.npages - 1
    assert resident(ram).all()
    ram.close()
