"""How hardware models see guest memory.

``hw`` may not import ``machine``; models that DMA into guest RAM or read guest-built
lists (a TCE list, a work area) take any object of this shape.  ``machine.ram.GuestRam``
is the real one; ``vmferry.testing.memory.ByteMemory`` is a small one for tests.
"""

from __future__ import annotations

from typing import Protocol


class GuestMemory(Protocol):
    size: int

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes at guest-physical ``gpa``; raises GuestMemoryError."""

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        """Store ``data`` at ``gpa`` and mark the pages dirty; raises GuestMemoryError."""
