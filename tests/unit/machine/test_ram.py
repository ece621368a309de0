from __future__ import annotations

import numpy as np
import pytest

from vmferry.errors import ConfigError, GuestMemoryError
from vmferry.machine.ram import PAGE_4K, PAGE_64K, GuestRam

MIB = 1024 * 1024


def test_read_write_roundtrip_and_bounds() -> None:
    ram = GuestRam(4 * MIB)
    ram.write(4090, b"hello world")
    assert ram.read(4090, 11) == b"hello world"
    before = ram.read(0, 16)
    for gpa, n in [(-1, 1), (4 * MIB - 1, 2), (4 * MIB, 1)]:
        with pytest.raises(GuestMemoryError):
            ram.read(gpa, n)
        with pytest.raises(GuestMemoryError):
            ram.write(gpa, b"x" * n)
    assert ram.read(0, 16) == before


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError):
        GuestRam(4097)
    with pytest.raises(ConfigError):
        GuestRam(MIB, page_size=8192)


def test_dirty_log_get_and_clear() -> None:
    ram = GuestRam(MIB)
    ram.write(0, b"a")  # not logging yet
    ram.start_dirty_log()
    assert ram.get_dirty_log().count == 0
    ram.write(PAGE_4K * 3 + 100, b"x" * PAGE_4K)  # spans pages 3 and 4
    ram.poke_words(np.array([10, 11]), 0, np.array([1, 2], dtype=np.uint64))
    log = ram.get_dirty_log()
    assert log.pages().tolist() == [3, 4, 10, 11]
    assert ram.get_dirty_log().count == 0  # cleared
    packed = log.packed()
    assert int(packed[0]) == (1 << 3) | (1 << 4) | (1 << 10) | (1 << 11)
    ram.stop_dirty_log()
    ram.write(0, b"b")
    assert ram.get_dirty_log().count == 0


def test_zero_mask_uses_contents_not_history() -> None:
    ram = GuestRam(MIB)
    assert ram.zero_mask(0, ram.npages).all()
    ram.write(PAGE_4K * 5 + PAGE_4K - 1, b"\x01")  # last byte of page 5
    ram.write(PAGE_4K * 6, b"\x00" * 8)  # written, but still zero
    mask = ram.zero_mask(0, ram.npages)
    assert not mask[5] and mask[6] and mask.sum() == ram.npages - 1


def test_zero_pages_only_touches_populated() -> None:
    ram = GuestRam(MIB)
    ram.write(PAGE_4K * 2, b"\xff" * 10)
    ram.start_dirty_log()
    ram.zero_pages(0, 8)
    assert ram.read(PAGE_4K * 2, 10) == b"\0" * 10
    assert ram.get_dirty_log().pages().tolist() == [2]


def test_digest_tracks_contents() -> None:
    a, b = GuestRam(MIB), GuestRam(MIB)
    assert a.digest() == b.digest()
    a.write(123, b"z")
    assert a.digest() != b.digest()
    b.write(123, b"z")
    assert a.digest() == b.digest()


def test_64k_pages() -> None:
    ram = GuestRam(4 * MIB, page_size=PAGE_64K)
    assert ram.npages == 64
    ram.start_dirty_log()
    ram.write(PAGE_64K + 5, b"q")
    assert ram.get_dirty_log().pages().tolist() == [1]


def test_eight_gib_guest_is_lazy() -> None:
    ram = GuestRam(8 * 1024 * MIB)
    ram.write(8 * 1024 * MIB - 8, b"12345678")
    assert ram.read(8 * 1024 * MIB - 8, 8) == b"12345678"
    assert ram.zero_mask(0, ram.npages).sum() == ram.npages - 1
    ram.close()
