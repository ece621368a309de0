"""Guest RAM of an x86-64 KVM VM, whose dirty log is KVM's.

Three ways to read it (the definition key ``dirty_log``):

``get``             ``KVM_GET_DIRTY_LOG``: KVM hands over the slot's bitmap and re-protects
                    the pages in one ioctl.
``manual-protect``  ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: GET reads the bitmap only;
                    ``KVM_CLEAR_DIRTY_LOG`` then re-protects exactly the pages read.
``ring``            ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL``: each vCPU logs the pages it dirties
                    into a ring of its own (mapped from its fd); a read harvests every
                    ring and calls ``KVM_RESET_DIRTY_RINGS``.  The cost of a read follows
                    the pages dirtied, not the size of guest RAM.  A ring that fills up
                    stops its vCPU with ``KVM_EXIT_DIRTY_RING_FULL``: the vCPU's thread
                    harvests (:meth:`KvmGuestRam.ring_full`) and re-enters; what it
                    harvested waits for the next read.

KVM logs only what the guest writes: the VMM's own writes are marked by the VMM
(:meth:`GuestRam.device_write` and friends) and added to every read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from vmferry.hw.x86 import kvm
from vmferry.machine.ram import PAGE_4K, DirtyLog, GuestRam

SLOT = 0
#: how each mode is reported (``vm show``, the job's source report)
DIRTY_LOG_MODES = {"get": "KVM_GET_DIRTY_LOG",
                   "manual-protect": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (GET + CLEAR)",
                   "ring": "KVM_CAP_DIRTY_LOG_RING_ACQ_REL (per-vCPU rings)"}
#: bytes of each vCPU's ring (65536 entries of 16 bytes), capped by what KVM offers.  Rings
#: that hold far more than a pass dirties cost nothing; a small ring costs full-ring exits.
DEFAULT_RING_BYTES = 1 << 20


class KvmGuestRam(GuestRam):
    """Guest RAM in 4 KiB pages (no transparent huge pages: first touch of THP memory is
    slow on the hosts vmferry targets) whose dirty log is KVM's (see the module
    docstring).  The guest writes pages behind the VMM's back, so no page counts as zero
    without a look."""

    def __init__(self, size: int) -> None:
        super().__init__(size, PAGE_4K, huge_pages=False)
        self.kvm_vm: kvm.KvmVm | None = None
        self.mode = "get"
        self.reads = 0
        self.pages_reported = 0
        #: (guest time, pages) of the last reads, for the observed dirty rate
        self.history: list[tuple[float, int]] = []
        self.now: Callable[[], float] = lambda: 0.0
        #: ring mode: the vCPUs' rings, what full-ring exits harvested since the last
        #: read, and the guard that serialises harvests (the vCPU threads' and the
        #: reader's): this layer starts no threads, the host's vCPU threads install a lock
        self.rings: list[kvm.DirtyRing] = []
        self.ring_pending = np.zeros(self.npages, dtype=np.bool_)
        self.ring_guard: AbstractContextManager[object] = contextlib.nullcontext()
        self.ring_full_exits = 0

    @property
    def dirty_tracking(self) -> str:
        return DIRTY_LOG_MODES[self.mode]

    @property
    def address(self) -> int:
        return int(self.bytes.ctypes.data)

    def populate(self, first: int, count: int) -> bool:
        """Fault pages ``[first, first + count)`` in, writable, without touching their
        contents (``MADV_POPULATE_WRITE``): a destination populated ahead of the stream
        takes pages much faster.  False if this kernel cannot."""
        if first < 0 or count <= 0 or first + count > self.npages:
            return False
        return kvm.populate_write(self.address + first * self.page_size,
                                  count * self.page_size)

    def attach(self, vm: kvm.KvmVm, mode: str) -> None:
        """The memory slot, dirty-logged from creation (in ring mode the ring must be
        enabled on ``vm`` already)."""
        self.kvm_vm = vm
        self.mode = mode
        vm.set_memory(SLOT, 0, self.size, self.address, kvm.MEM_LOG_DIRTY_PAGES)

    def attach_rings(self, rings: list[kvm.DirtyRing]) -> None:
        self.rings = rings

    # --- reading KVM's log -------------------------------------------------------------

    def _harvest(self, into: np.ndarray[Any, np.dtype[np.bool_]]) -> int:
        """Ring mode: every ring's published entries into ``into``, then RESET.  Call with
        ``ring_guard`` held; how many entries were harvested."""
        assert self.kvm_vm is not None
        count = 0
        for ring in self.rings:
            offsets = ring.harvest()
            if offsets.size:
                into[offsets[offsets < self.npages].astype(np.int64)] = True
                count += int(offsets.size)
        if count:
            self.kvm_vm.reset_dirty_rings()
        return count

    def ring_full(self) -> None:
        """A vCPU stopped with ``KVM_EXIT_DIRTY_RING_FULL``: harvest (kept for the next
        read) so it can re-enter.  Called from the vCPU's thread."""
        with self.ring_guard:
            self.ring_full_exits += 1
            self._harvest(self.ring_pending)

    def _read_kvm(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        if self.kvm_vm is None:
            return np.zeros(self.npages, dtype=np.bool_)
        if self.mode == "ring":
            with self.ring_guard:
                bitmap, self.ring_pending = (self.ring_pending,
                                             np.zeros(self.npages, dtype=np.bool_))
                self._harvest(bitmap)
            self.reads += 1
            return bitmap
        words = self.kvm_vm.get_dirty_log(SLOT, self.npages)
        if self.mode == "manual-protect" and words.any():
            self.kvm_vm.clear_dirty_log(SLOT, 0, self.npages, words)
        self.reads += 1
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.npages]
        return bits.view(np.bool_)

    def start_dirty_log(self) -> None:
        self._read_kvm()
        super().start_dirty_log()

    def get_dirty_log(self) -> DirtyLog:
        from_kvm = self._read_kvm()  # KVM's get-and-clear is atomic against the guest
        with self.log_guard:  # and the VMM's own marks are taken the same way
            from_vmm, self.dirty = self.dirty, np.zeros(self.npages, dtype=np.bool_)
        bitmap = from_kvm | from_vmm
        count = int(np.count_nonzero(bitmap))
        self.pages_reported += count
        self.history.append((self.now(), count))
        del self.history[:-8]
        return DirtyLog(self.page_size, bitmap)

    def zero_mask_at(self, index: np.ndarray[Any, np.dtype[np.int64]]
                     ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        words = self.bytes.view(np.uint64).reshape(self.npages, self.page_size // 8)
        mask = np.zeros(index.size, dtype=np.bool_)
        suspects = np.flatnonzero(words[index, 0] == 0)
        if suspects.size:
            mask[suspects] = ~words[index[suspects]].any(axis=1)
        return mask
