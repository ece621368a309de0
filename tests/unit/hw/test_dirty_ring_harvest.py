"""The dirty ring's harvest, against a ring in anonymous memory that a test fills the way
KVM does (slot and offset first, then the DIRTY flag), round and round."""

from __future__ import annotations

import mmap

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.hw.x86 import kvm


def anonymous_ring(entries: int) -> kvm.DirtyRing:
    ring = kvm.DirtyRing.__new__(kvm.DirtyRing)
    ring.size = entries * kvm.DIRTY_GFN.itemsize
    ring.map = mmap.mmap(-1, ring.size)
    ring.entries = np.frombuffer(ring.map, dtype=kvm.DIRTY_GFN)
    ring.n, ring.fetch, ring.harvested = entries, 0, 0
    return ring


class FakeKvm:
    """KVM's side: push entries at its index, and free RESET entries on a reset."""

    def __init__(self, ring: kvm.DirtyRing) -> None:
        self.ring, self.index, self.reset_index = ring, 0, 0

    def push(self, offset: int) -> bool:
        e = self.ring.entries
        i = self.index % self.ring.n
        if self.index - self.reset_index >= self.ring.n:
            return False  # full
        e["slot"][i], e["offset"][i] = 0, offset
        e["flags"][i] = kvm.DIRTY_GFN_DIRTY
        self.index += 1
        return True

    def reset(self) -> None:
        e = self.ring.entries
        while self.reset_index < self.index:
            i = self.reset_index % self.ring.n
            if e["flags"][i] != kvm.DIRTY_GFN_RESET:
                break
            e["flags"][i] = 0
            self.reset_index += 1


@settings(max_examples=40, deadline=None)
@given(entries=st.sampled_from([16, 64, 256]),
       batches=st.lists(st.integers(0, 600), min_size=1, max_size=10))
def test_harvest_returns_every_published_entry_once_in_order(entries: int,
                                                             batches: list[int]) -> None:
    ring = anonymous_ring(entries)
    k = FakeKvm(ring)
    pushed: list[int] = []
    got: list[int] = []
    offset = 0
    for batch in batches:
        for _ in range(batch):
            if not k.push(offset):
                break  # a full ring: KVM would exit DIRTY_RING_FULL until a harvest
            pushed.append(offset)
            offset += 1
        got.extend(ring.harvest().tolist())
        k.reset()
    got.extend(ring.harvest().tolist())
    assert got == pushed and ring.harvested == len(pushed)
    assert ring.harvest().size == 0


def test_harvest_stops_at_an_unpublished_entry() -> None:
    ring = anonymous_ring(64)
    k = FakeKvm(ring)
    for i in range(5):
        k.push(100 + i)
    ring.entries["flags"][2] = 0  # entry 2 not published yet (KVM sets DIRTY last)
    assert ring.harvest().tolist() == [100, 101]
    ring.entries["flags"][2] = kvm.DIRTY_GFN_DIRTY
    assert ring.harvest().tolist() == [102, 103, 104]
