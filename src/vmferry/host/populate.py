"""Populate a destination's guest RAM ahead of the incoming stream.

A fresh destination pays a page fault and a page clear for every page it receives, in the
receiving thread, between two reads of the socket.  :class:`Populator` moves that work to
a thread of its own: it faults pages in, writable and without touching their contents
(``madvise(MADV_POPULATE_WRITE)``, Linux 5.14), in chunks, a bounded distance ahead of the
receiver's position (:attr:`GuestRam.write_frontier`).  Two rules keep it honest:

* it starts with the first page of data and never runs more than ``ahead_bytes`` past
  the frontier, so memory that the stream only ever describes as zero (a never-touched
  4 GiB guest) is not populated at all, and skipped zero runs at most one window;
* it calls ``madvise`` through ctypes, which lets go of the GIL for the call
  (``mmap.madvise`` holds it, which would stop the receiver for every chunk).

If the receiver overtakes it, it jumps to the frontier: populating behind the receiver is
wasted work.  A kernel without MADV_POPULATE_WRITE answers EINVAL; the populator then
stops and records why, and the receiver faults pages in itself as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from vmferry.machine.ram import GuestRam

MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux 5.14
MIB = 1024 * 1024
#: chunk per madvise call and distance ahead of the receiver (measured: docs/performance.md)
CHUNK_BYTES = 8 * MIB
AHEAD_BYTES = 64 * MIB
#: how often an idle populator (caught up with its window) looks at the frontier again
POLL_S = 0.002

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int


def populate_write(address: int, length: int) -> int:
    """``madvise(address, length, MADV_POPULATE_WRITE)`` without the GIL: 0 or errno."""
    if _madvise(address, length, MADV_POPULATE_WRITE) == 0:
        return 0
    return ctypes.get_errno()


class Populator:
    """Faults ``ram`` in from a thread, a window ahead of its write frontier."""

    def __init__(
        self, ram: GuestRam, *, ahead_bytes: int = AHEAD_BYTES, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        self.ram = ram
        self.ahead_pages = max(1, ahead_bytes // ram.page_size)
        self.chunk_pages = max(1, chunk_bytes // ram.page_size)
        #: pages this populator faulted in, and the end of the highest range it did
        self.populated_pages = 0
        self.done_to = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="populate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ram = self.ram
        base, ps, npages = ram.address, ram.page_size, ram.npages
        while not self._stop.is_set() and self.done_to < npages:
            frontier = ram.write_frontier
            if frontier == 0:  # no page data yet: the stream may be all zero runs
                self._stop.wait(POLL_S)
                continue
            start = max(self.done_to, frontier)
            end = min(npages, frontier + self.ahead_pages, start + self.chunk_pages)
            if start >= end:
                self._stop.wait(POLL_S)
                continue
            err = populate_write(base + start * ps, (end - start) * ps)
            if err:
                self.error = f"madvise(MADV_POPULATE_WRITE): {os.strerror(err)}"
                return
            self.populated_pages += end - start
            self.done_to = end

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop and wait for the thread (before the RAM may be closed)."""
        self._stop.set()
        self._thread.join()
