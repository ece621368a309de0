"""Guest memory as the hardware models see it.

``hw`` may not import ``machine``; anything in ``hw`` or ``guest`` that reads or writes
guest RAM takes an object satisfying :class:`GuestMemory` (``machine.ram.GuestRam`` does).
"""

from __future__ import annotations

from typing import Protocol


class GuestMemory(Protocol):
    size: int  # bytes

    def read(self, gpa: int, n: int) -> bytes:
        """Read ``n`` bytes at ``gpa``; raises GuestMemoryError outside RAM."""
        ...

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``gpa`` and mark the touched pages dirty."""
        ...
