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
:attr:`End.readable`).  :class:`PipeLink` wraps an end as the host's byte link, so the
host daemon's real migration workers run over these pipes in tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
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


class PipeLink:
    """One :class:`End` as the host's byte link (``vmferry.host.transport.Link``), so
    the host's real migration workers can run over in-memory pipes, each in its own
    thread.

    ``recv_into`` polls every ``poll_s`` seconds; while nothing is due it reports the
    time without progress to ``on_stall``, multiplied by ``time_scale`` (a test of a
    30 s bound need not wait 30 s).  Without ``on_stall`` it gives up after ``wait_s``.
    ``sizes`` records the size of every ``send`` -- one frame each, so its running sums
    are the frame boundaries of this direction.  Both ends of a pair share ``lock``."""

    def __init__(self, end: End, lock: threading.Lock, time_scale: float = 1.0,
                 poll_s: float = 0.001, wait_s: float = 10.0) -> None:  # fmt: skip
        self.end, self.lock = end, lock
        self.time_scale, self.poll_s, self.wait_s = time_scale, poll_s, wait_s
        self.sizes: list[int] = []

    def send(self, buffers: Sequence[Buffer], on_stall: Callable[[float], None] | None = None,
             ) -> int:  # fmt: skip
        with self.lock:
            n = self.end.send(list(buffers))
        self.sizes.append(n)
        return n

    def recv_into(self, view: memoryview,
                  on_stall: Callable[[float], None] | None = None) -> int:  # fmt: skip
        start = time.monotonic()
        while True:
            with self.lock:
                data = self.end.recv(len(view))
            if data is not None:
                view[: len(data)] = data
                return len(data)
            waited = time.monotonic() - start
            if on_stall is not None:
                on_stall(waited * self.time_scale)
            elif waited > self.wait_s:
                raise TimeoutError(f"nothing arrived for {waited:.1f} s")
            time.sleep(self.poll_s)

    def readable(self) -> bool:
        with self.lock:
            return self.end.readable

    def queued(self) -> int:
        return 0

    def close(self) -> None:
        with self.lock:
            self.end.close()


def link_pair(a_to_b: Faults | None = None, b_to_a: Faults | None = None,
              time_scale: float = 1.0) -> tuple[PipeLink, PipeLink]:  # fmt: skip
    """:func:`pipe_pair` as two :class:`PipeLink` s sharing one lock."""
    a, b = pipe_pair(a_to_b, b_to_a)
    lock = threading.Lock()
    return PipeLink(a, lock, time_scale), PipeLink(b, lock, time_scale)
