"""Guest memory as ``hw`` models see it.

``hw`` may not import ``machine``; code that reads or writes guest RAM takes any object with
this shape (the VM's ``GuestRam`` satisfies it).  :class:`ByteMemory` is a small reference
implementation backed by a bytearray, with a set of dirty 4 KiB pages; tests and scenario
modules use it.
"""

from __future__ import annotations

from typing import Protocol

from vmferry.errors import GuestMemoryError

DIRTY_PAGE_SHIFT = 12


class GuestMemory(Protocol):
    size: int  # bytes

    def read(self, gpa: int, n: int) -> bytes:
        """Read ``n`` bytes at ``gpa``; raises GuestMemoryError outside guest RAM."""
        ...

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``gpa`` and mark the touched pages dirty."""
        ...


class ByteMemory:
    """Guest RAM in a bytearray.  Invariant: ``dirty`` holds 4 KiB page numbers written."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise GuestMemoryError(f"guest RAM size must be positive, got {size}")
        self.size = size
        self._buf = bytearray(size)
        self.dirty: set[int] = set()

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > self.size:
            raise GuestMemoryError(f"access [{gpa:#x}, +{n:#x}) outside guest RAM ({self.size:#x})")

    def read(self, gpa: int, n: int) -> bytes:
        self._check(gpa, n)
        return bytes(self._buf[gpa : gpa + n])

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        n = len(data)
        self._check(gpa, n)
        self._buf[gpa : gpa + n] = data
        if n:
            first, last = gpa >> DIRTY_PAGE_SHIFT, (gpa + n - 1) >> DIRTY_PAGE_SHIFT
            self.dirty.update(range(first, last + 1))
