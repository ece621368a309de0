"""Guest RAM backed by real anonymous memory, with a KVM-style dirty log.

Theory of operation
-------------------
RAM is one private anonymous mapping (``MAP_PRIVATE | MAP_ANONYMOUS``), seen through
numpy.  Nothing is faulted in at creation: a 1 GiB guest that never touches its memory
costs nothing, and a fresh destination pays first-touch only for pages it actually
receives.

The mapping is in 4 KiB pages (``MADV_NOHUGEPAGE``) unless asked otherwise: measured on
this machine kind, a destination populates 4 KiB pages ahead of the stream faster than
transparent huge pages (docs/performance.md has the figures).  A destination host
populates the memory from a thread while the stream arrives (``MADV_POPULATE_WRITE``, see
``vmferry.host.populate``); :attr:`GuestRam.address` and :attr:`GuestRam.write_frontier`
(one past the highest page stored so far) are what that thread needs to stay ahead of the
receiver without populating memory that never gets data.

Two per-page bitmaps (numpy ``bool`` arrays, one byte a page) sit beside the memory:

* ``dirty`` -- KVM's dirty log.  While logging is on, every write through this object
  marks its pages; :meth:`GuestRam.get_dirty_log` returns the marked pages and clears them
  in one step (``KVM_GET_DIRTY_LOG`` semantics; ``KVM_CLEAR_DIRTY_LOG`` is folded in).
* ``populated`` -- pages written at least once since creation.  A page never written is
  known to be zero without reading it, so zero-page detection scans only populated pages
  and an idle 4 GiB guest is classified without faulting 4 GiB of zero pages.

Writers store data *before* marking pages dirty.  Together with get-and-clear this keeps
the pre-copy invariant: a page whose contents changed after the sender read it is dirty
again when the next pass starts.

Get-and-clear is atomic against marks, as KVM's is (KVM exchanges each bitmap word with
``xchg``): every mark lands either in the log one call returns or in the next one, never
between the two.  Here the marks and the get-and-clear take ``log_guard`` and the get
*swaps* the bitmap for a fresh one instead of copying and clearing it.  This object is
sans-IO and does not know who writes concurrently: single-threaded use needs nothing, the
host's guest thread installs a ``threading.Lock`` (:mod:`vmferry.host.runner`), and the
interleaving explorer a :class:`~vmferry.sync.ModelLock` (scenario ``dirty-log``).
``log_mode = "copy_then_clear"`` keeps the historical bug for that scenario: the log is
copied and then cleared without the guard, and a mark that lands in between is lost.

Invariant: ``dirty`` and ``populated`` have one entry per page; ``dirty`` is all False
while logging is off; ``dirty`` is marked and replaced only under ``log_guard``.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.errors import ConfigError, GuestMemoryError
from vmferry.sync import yield_point

PAGE_4K = 4096
PAGE_64K = 65536
_SUPPORTED_PAGE_SIZES = (PAGE_4K, PAGE_64K)
_HUGE = 2 * 1024 * 1024
#: back guest RAM with transparent huge pages?  No: chosen by measurement (see the module
#: docstring and docs/performance.md)
HUGE_PAGES = False
#: "atomic": get-and-clear under the guard (correct); "copy_then_clear": the lost-mark bug
LOG_MODES = ("atomic", "copy_then_clear")

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class DirtyLog:
    """One get-and-clear of the dirty log."""

    page_size: int
    bitmap: BoolArray  # one bool a page

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.bitmap))

    def pages(self) -> IntArray:
        """Indexes of dirty pages, ascending."""
        return np.flatnonzero(self.bitmap).astype(np.int64)

    def packed(self) -> npt.NDArray[np.uint64]:
        """The bitmap as KVM hands it out: little-endian bit order in 64-bit words."""
        bits = np.packbits(self.bitmap, bitorder="little")
        pad = (-bits.size) % 8
        return np.concatenate([bits, np.zeros(pad, np.uint8)]).view("<u8")


class GuestRam:
    """``size`` bytes of guest RAM in ``page_size`` pages, backed by anonymous memory."""

    @property
    def dirty_tracking(self) -> str:
        """How this RAM's dirty log is kept (a migration's statistics report it)."""
        return f"VMM bitmap ({self.log_mode})"

    def __init__(
        self,
        size: int,
        page_size: int = PAGE_4K,
        *,
        log_mode: str = "atomic",
        huge_pages: bool = HUGE_PAGES,
    ) -> None:
        if log_mode not in LOG_MODES:
            raise ConfigError(f"dirty log mode {log_mode!r} is not one of {LOG_MODES}")
        if page_size not in _SUPPORTED_PAGE_SIZES:
            raise ConfigError(f"page size {page_size} not supported ({_SUPPORTED_PAGE_SIZES})")
        if size <= 0 or size % page_size:
            raise ConfigError(f"RAM size {size} is not a positive multiple of {page_size}")
        self.size = size
        self.page_size = page_size
        self.npages = size // page_size
        self.huge_pages = huge_pages
        self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE"
        if size >= _HUGE and hasattr(mmap, advice):
            self._mmap.madvise(getattr(mmap, advice))
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self._mmap, dtype=np.uint8)
        self.pages: npt.NDArray[np.uint8] = self.bytes.reshape(self.npages, page_size)
        self._words = self.bytes.view(np.uint64).reshape(self.npages, page_size // 8)
        self.dirty: BoolArray = np.zeros(self.npages, dtype=np.bool_)
        self.populated: BoolArray = np.zeros(self.npages, dtype=np.bool_)
        self.logging = False
        self.log_mode = log_mode
        #: taken by every dirty mark and by get-and-clear; whoever runs guest writers
        #: concurrently with the log reader installs a real lock (see the module docstring)
        self.log_guard: AbstractContextManager[object] = contextlib.nullcontext()
        #: one past the highest page stored through this object (a receiver's position)
        self.write_frontier = 0

    @property
    def address(self) -> int:
        """Where the memory starts in this process (for madvise from the host)."""
        return int(self.bytes.ctypes.data)

    # --- plain access ----------------------------------------------------------------

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > self.size:
            raise GuestMemoryError(
                f"access [{gpa:#x}, {gpa + n:#x}) outside guest RAM of {self.size:#x} bytes"
            )

    def read(self, gpa: int, n: int) -> bytes:
        self._check(gpa, n)
        return self.bytes[gpa : gpa + n].tobytes()

    def view(self, gpa: int, n: int) -> memoryview:
        """A read-only zero-copy window (for the migration sender)."""
        self._check(gpa, n)
        return memoryview(self._mmap)[gpa : gpa + n].toreadonly()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._check(gpa, n)
        if n == 0:
            return
        self.bytes[gpa : gpa + n] = np.frombuffer(data, dtype=np.uint8)
        first, last = gpa // self.page_size, (gpa + n - 1) // self.page_size
        self._mark(slice(first, last + 1))

    def device_write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """A device's DMA write: stored like :meth:`write`, but the dirty log (which only
        sees vCPU writes) does not record it; see :meth:`mark_dirty`."""
        n = len(data)
        self._check(gpa, n)
        if n == 0:
            return
        self.bytes[gpa : gpa + n] = np.frombuffer(data, dtype=np.uint8)
        self.populated[gpa // self.page_size : (gpa + n - 1) // self.page_size + 1] = True

    def write_pages(self, first: int, data: npt.NDArray[np.uint8]) -> None:
        """Store whole pages starting at page ``first`` (``data`` shaped (k, page_size))."""
        k = data.shape[0]
        if first < 0 or first + k > self.npages or data.shape[1:] != (self.page_size,):
            raise GuestMemoryError(f"pages [{first}, {first + k}) do not fit guest RAM")
        self.pages[first : first + k] = data
        self._mark(slice(first, first + k))
        self.write_frontier = max(self.write_frontier, first + k)

    def receive_view(self, first: int, count: int) -> memoryview:
        """A writable window over pages ``[first, first + count)``, for a receiver that
        takes page data straight into guest memory; :meth:`received` afterwards."""
        if first < 0 or count <= 0 or first + count > self.npages:
            raise GuestMemoryError(f"pages [{first}, {first + count}) do not fit guest RAM")
        ps = self.page_size
        return self.bytes[first * ps : (first + count) * ps].data

    def received(self, first: int, count: int) -> None:
        """Pages ``[first, first + count)`` were stored through :meth:`receive_view`."""
        self._mark(slice(first, first + count))
        self.write_frontier = max(self.write_frontier, first + count)

    def fill_words(
        self, first: int, count: int, produce: Callable[[npt.NDArray[np.uint64]], object]
    ) -> None:
        """Let ``produce(out)`` write pages ``[first, first + count)`` in place, as words."""
        if first < 0 or count < 0 or first + count > self.npages:
            raise GuestMemoryError(f"pages [{first}, {first + count}) do not fit guest RAM")
        produce(self._words[first : first + count].reshape(-1))
        self._mark(slice(first, first + count))
        self.write_frontier = max(self.write_frontier, first + count)

    def scatter_pages(self, index: IntArray, data: npt.NDArray[np.uint8]) -> None:
        """Store ``data[i]`` into page ``index[i]`` (vectorised; for workloads and DMA)."""
        if not index.size:
            return
        top = int(index.max())
        if int(index.min()) < 0 or top >= self.npages:
            raise GuestMemoryError("page index outside guest RAM")
        self.pages[index] = data
        self._mark(index)
        self.write_frontier = max(self.write_frontier, top + 1)

    def poke_words(self, index: IntArray, word: int, values: npt.NDArray[np.uint64]) -> None:
        """Store one 64-bit word at word offset ``word`` of each page in ``index``."""
        if index.size and (int(index.min()) < 0 or int(index.max()) >= self.npages):
            raise GuestMemoryError("page index outside guest RAM")
        if not 0 <= word < self.page_size // 8:
            raise GuestMemoryError(f"word offset {word} outside a {self.page_size}-byte page")
        self._words[index, word] = values
        self._mark(index)

    def _mark(self, where: slice | IntArray) -> None:
        self.populated[where] = True
        if self.logging:
            yield_point("mark dirty", ("dirty-log", id(self)))
            with self.log_guard:
                if self.logging:
                    self.dirty[where] = True

    def mark_dirty(self, gpa: int, n: int) -> None:
        """Count ``[gpa, gpa + n)`` as written in the dirty log without touching it: for a
        device that may have written there by DMA, which the CPU's dirty log never sees."""
        self._check(gpa, n)
        if n and self.logging:
            with self.log_guard:
                self.dirty[gpa // self.page_size : (gpa + n - 1) // self.page_size + 1] = True

    def gather(self, index: IntArray, out: npt.NDArray[np.uint8]) -> None:
        """Copy pages ``index`` into ``out`` (shaped (len(index), page_size))."""
        np.take(self.pages, index, axis=0, out=out)

    def zero_pages_at(self, index: IntArray) -> None:
        """Make pages ``index`` read as zero, touching only populated ones."""
        if index.size and (int(index.min()) < 0 or int(index.max()) >= self.npages):
            raise GuestMemoryError("page index outside guest RAM")
        touched = index[self.populated[index]]
        if touched.size:
            self.pages[touched] = 0
            self.populated[touched] = False
            if self.logging:
                with self.log_guard:
                    self.dirty[touched] = True

    def zero_mask_at(self, index: IntArray) -> BoolArray:
        """Which of pages ``index`` are all zero (vectorised).

        A page never written is zero without a look.  A non-zero first word settles a page
        at once (random data: nearly every page); only live pages that start with a zero
        word are scanned whole."""
        mask = ~self.populated[index]
        live = np.flatnonzero(~mask)  # never-written pages are not read (not even faulted)
        suspects = live[self._words[index[live], 0] == 0]
        if suspects.size:
            mask[suspects] = ~self._words[index[suspects]].any(axis=1)
        return mask

    def zero_pages(self, first: int, count: int) -> None:
        """Make ``count`` pages from ``first`` read as zero, touching only populated ones."""
        if first < 0 or count < 0 or first + count > self.npages:
            raise GuestMemoryError(f"pages [{first}, {first + count}) do not fit guest RAM")
        self.zero_pages_at(np.arange(first, first + count, dtype=np.int64))

    # --- dirty log -------------------------------------------------------------------

    def start_dirty_log(self) -> None:
        with self.log_guard:
            self.dirty = np.zeros(self.npages, dtype=np.bool_)
            self.logging = True

    def stop_dirty_log(self) -> None:
        with self.log_guard:
            self.logging = False
            self.dirty = np.zeros(self.npages, dtype=np.bool_)

    def get_dirty_log(self) -> DirtyLog:
        """Return the dirty pages and clear the log, atomically against every mark: a
        page marked during the call is in this log or in the next one."""
        if self.log_mode == "copy_then_clear":  # the historical bug, for the explorer
            snapshot = self.dirty.copy()
            yield_point("dirty log copied", ("dirty-log", id(self)))
            self.dirty[:] = False
            return DirtyLog(self.page_size, snapshot)
        yield_point("get dirty log", ("dirty-log", id(self)))
        fresh = np.zeros(self.npages, dtype=np.bool_)  # calloc'd: no cost until touched
        with self.log_guard:
            taken, self.dirty = self.dirty, fresh
        return DirtyLog(self.page_size, taken)

    # --- classification and digests --------------------------------------------------

    def zero_mask(self, first: int, count: int) -> BoolArray:
        """Which of ``count`` pages from ``first`` are all zero (vectorised)."""
        return self.zero_mask_at(np.arange(first, first + count, dtype=np.int64))

    def digest(self) -> str:
        """xxh3-128 of all of RAM: equal digests mean equal memory."""
        h = xxhash.xxh3_128()
        step = 64 * 1024 * 1024
        view = memoryview(self._mmap)
        for off in range(0, self.size, step):
            h.update(view[off : off + step])
        return h.hexdigest()

    def close(self) -> None:
        """Release the memory; the object is unusable afterwards."""
        del self.pages, self._words, self.bytes
        # a caller may still hold a view: then the memory goes when that view does
        with contextlib.suppress(BufferError):
            self._mmap.close()
