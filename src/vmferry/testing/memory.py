"""A tiny bytearray-backed :class:`~vmferry.hw.memory.GuestMemory` for tests."""

from __future__ import annotations

from vmferry.errors import GuestMemoryError

PAGE_SIZE = 4096


class ByteMemory:
    """Guest RAM of ``size`` bytes with a page-granular dirty log."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise GuestMemoryError(f"guest memory size must be positive, not {size}")
        self.size = size
        self._data = bytearray(size)
        #: invariant: page numbers written since the last :meth:`take_dirty`
        self.dirty: set[int] = set()

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > self.size:
            raise GuestMemoryError(f"access [{gpa:#x}, +{n:#x}) outside {self.size:#x} bytes")

    def read(self, gpa: int, n: int) -> bytes:
        self._check(gpa, n)
        return bytes(self._data[gpa : gpa + n])

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        n = len(data)
        self._check(gpa, n)
        self._data[gpa : gpa + n] = data
        if n:
            self.dirty.update(range(gpa // PAGE_SIZE, (gpa + n - 1) // PAGE_SIZE + 1))

    def take_dirty(self) -> set[int]:
        pages, self.dirty = self.dirty, set()
        return pages
