"""In-memory byte pipes that misbehave on purpose, for protocol tests.

A :class:`Pipe` carries bytes one way.  What the writer wrote is delivered to the reader
in order, but the pipe decides *how*:

* ``trickle=n``: at most ``n`` bytes per read;
* ``split_at={offsets}``: a read never crosses one of these stream offsets (so a frame
  header can arrive in two pieces, a body in three, ...);
* ``stall_at=k``: bytes from offset ``k`` on are held until :meth:`Pipe.release`;
* ``cut_at=k``: the connection breaks at offset ``k``: the reader gets everything before
  ``k`` and then end of file, the writer gets ``ConnectionResetError`` from then on.

:func:`pipe_pair` makes the two directions of one connection; each :class:`End` has the
socket-like ``send``/``recv``/``close``.  Nothing here blocks: ``recv`` returns ``None``
when no byte is due, so single-threaded tests and the explorer's model threads both
drive them (the explorer waits with :func:`vmferry.sync.wait_until` on
:attr:`End.readable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vmferry.migration.stream.records import Buffer


@dataclass(frozen=True)
class Faults:
    trickle: int | None = None
    split_at: frozenset[int] = field(default_factory=frozenset)
    stall_at: int | None = None
    cut_at: int | None = None

    def __post_init__(self) -> None:
        if self.trickle is not None and self.trickle < 1:
            raise ValueError(f"trickle must be at least one byte, not {self.trickle}")


class Pipe:
    """One direction of an in-memory connection (see the module docstring)."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self._data = bytearray()
        #: invariant: bytes [0, delivered) were read; delivered <= len(_data)
        self.delivered = 0
        self.closed = False  # the writer closed: EOF after the data
        self.cut = False  # the connection broke: EOF at the cut, writes fail
        #: invariant: while ``stalled``, bytes from offset ``stall_at`` on are held
        self.stall_at = self.faults.stall_at
        self.stalled = self.stall_at is not None
        self._cut_at = self.faults.cut_at

    @property
    def written(self) -> int:
        return len(self._data)

    # --- writer ----------------------------------------------------------------------

    def write(self, buffers: Buffer | Sequence[Buffer]) -> int:
        if self.cut or self.closed:
            raise ConnectionResetError("the connection was cut" if self.cut else
                                       "write after close")  # fmt: skip
        parts: Iterable[Buffer] = (
            [buffers] if isinstance(buffers, bytes | bytearray | memoryview) else buffers
        )
        n = 0
        for part in parts:
            view = memoryview(part).cast("B")
            self._data += view
            n += view.nbytes
        if self._cut_at is not None and len(self._data) > self._cut_at:
            del self._data[self._cut_at :]
            self.cut = True
            raise ConnectionResetError(f"the connection was cut at byte {self._cut_at}")
        return n

    def close(self) -> None:
        self.closed = True

    def break_now(self, lose_in_flight: bool = False) -> None:
        """Cut the connection now: what a stall still holds is lost with it, and with
        ``lose_in_flight`` every byte the reader has not read yet (a reset)."""
        if lose_in_flight:
            del self._data[self.delivered :]
        elif self.stalled and self.stall_at is not None:
            del self._data[max(self.stall_at, self.delivered) :]
        self._cut_at = len(self._data)
        self.cut = True
        self.stalled = False

    def stall_now(self) -> None:
        """Hold every byte not read yet, and what comes after, until :meth:`release`."""
        self.stall_at, self.stalled = self.delivered, True

    def release(self) -> None:
        """End a stall: held bytes become readable."""
        self.stalled = False

    # --- reader ----------------------------------------------------------------------

    def _limit(self) -> int:
        """One past the last byte a read may return now."""
        end = len(self._data)
        if self.stalled and self.stall_at is not None:
            end = min(end, max(self.stall_at, self.delivered))
        for cut in self.faults.split_at:
            if self.delivered < cut < end:
                end = cut
        if self.faults.trickle is not None:
            end = min(end, self.delivered + self.faults.trickle)
        return end

    @property
    def at_eof(self) -> bool:
        return (self.cut or self.closed) and self.delivered == len(self._data)

    @property
    def readable(self) -> bool:
        """A read would return bytes or end of file now."""
        return self._limit() > self.delivered or self.at_eof

    def read(self, max_bytes: int = 1 << 20) -> bytes | None:
        """Up to ``max_bytes`` due bytes; ``b""`` at end of file; None if none is due."""
        end = min(self._limit(), self.delivered + max_bytes)
        if end > self.delivered:
            out = bytes(self._data[self.delivered : end])
            self.delivered = end
            return out
        return b"" if self.at_eof else None


@dataclass
class End:
    """One end of a connection: sends on ``out``, receives from ``inp``."""

    out: Pipe
    inp: Pipe

    def send(self, buffers: Buffer | Sequence[Buffer]) -> int:
        return self.out.write(buffers)

    def recv(self, max_bytes: int = 1 << 20) -> bytes | None:
        return self.inp.read(max_bytes)

    @property
    def readable(self) -> bool:
        return self.inp.readable

    def close(self) -> None:
        self.out.close()

    def cut(self, lose_in_flight: bool = True) -> None:
        """The connection breaks in both directions now; by default what the other side
        has not read yet is lost (a reset)."""
        self.out.break_now(lose_in_flight)
        self.inp.break_now(lose_in_flight)


def pipe_pair(a_to_b: Faults | None = None, b_to_a: Faults | None = None) -> tuple[End, End]:
    """Two connected ends ``(a, b)``; each direction with its own faults."""
    ab, ba = Pipe(a_to_b), Pipe(b_to_a)
    return End(ab, ba), End(ba, ab)
