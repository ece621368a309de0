"""Guest memory for tests: a bytearray-backed :class:`GuestMemory`."""

from __future__ import annotations

from vmferry.hw.memory import ByteMemory, GuestMemory

__all__ = ["ByteMemory", "GuestMemory"]
