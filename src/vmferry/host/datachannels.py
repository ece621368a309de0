"""Parallel data channels for guest RAM: the threads that move the bytes.

The wire format, its checks and the ordering rule live in
:mod:`vmferry.migration.multichannel` (sans-IO); this module only opens connections,
runs one thread per channel and turns every way a channel can fail into a failure of the
whole migration.

* The source (:class:`ChannelSink`) dials ``N`` extra connections to the destination's
  migration listener after the main handshake, each announced with a ``channel`` frame
  that carries the migration's one-time token and the channel's index (over TLS when
  this host serves TLS, as the main connection).  For every pass the session hands it
  the dirty mask; it deals the page runs round-robin to the channels, whose threads find
  zero pages, snapshot and checksum the others and ``sendmsg`` them, then send SYNC.
* The destination (:class:`ChannelGroup`) receives every channel's page data straight
  into the staging VM's memory (``recv_into`` a view of the page run: no intermediate
  buffer), verifies each record, and keeps the per-pass barrier: no channel applies pass
  ``k + 1`` before every channel finished pass ``k``.

A cut, a stall or a bad record in any channel fails the migration: the source's session
fails (its guest resumes), the destination's group wakes its main worker, which discards
the staging VM only after every channel thread has stopped writing into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import socket
import sys
import termios
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import numpy.typing as npt

from vmferry.errors import PeerError, VmferryError
from vmferry.host.faults import CutConnection, Fault, apply
from vmferry.host.transport import OnStall, recv_frame, send_buffers, send_frame
from vmferry.machine.ram import GuestRam
from vmferry.migration.multichannel import (
    HEADER_SIZE,
    MAX_CHANNELS,
    ChannelReader,
    ChannelWriter,
    Pages,
    RunCounts,
    Sync,
    Zero,
    deal_runs,
    encode_runs,
)
from vmferry.migration.source import SourceSession, page_runs

log = logging.getLogger("vmferry.host.datachannels")

#: the default number of data channels (measured: docs/performance.md)
DEFAULT_PARALLEL = 2
#: bytes a channel thread hands to one sendmsg, and its snapshot buffer
BATCH_BYTES = 8 * 1024 * 1024
BOUNCE_BYTES = 2 * BATCH_BYTES
#: bytes per run dealt to a channel
RUN_BYTES = 4 * 1024 * 1024
#: the destination's socket receive buffer per channel (as the main connection's)
RECEIVE_BUFFER = 2 * 1024 * 1024
#: how long a channel waits for data, or at a pass barrier, before it gives up
IDLE_TIMEOUT_S = 60.0
#: how often the source's driving thread looks up (cancel) while the channels send
POLL_S = 0.2


# --- source ------------------------------------------------------------------------------


class ChannelSink:
    """The source's data channels (a :class:`~vmferry.migration.source.RamSink`)."""

    def __init__(
        self,
        socks: list[socket.socket],
        session: SourceSession,
        *,
        on_stall: OnStall,
        check: Callable[[], None],
        progress: Callable[[], None] = lambda: None,
        fault: Fault | None = None,
    ) -> None:
        self.socks = socks
        self.session = session
        self.ram: GuestRam = session.vm.ram
        self.on_stall = on_stall
        self.check = check
        self.progress = progress
        self.cut = int(fault.action) if fault is not None and fault.phase == "cut-channel" \
            else None  # fmt: skip
        #: ``active:corrupt`` damages channel 0's first batch (after its checksums)
        self.corrupt = fault if fault is not None and fault.phase == "active" \
            and fault.action == "corrupt" else None  # fmt: skip
        self.writers = [ChannelWriter(i, self.ram.page_size) for i in range(len(socks))]
        bounce = max(BOUNCE_BYTES, 2 * RUN_BYTES, 2 * self.ram.page_size)
        self.bounces = [np.empty(bounce, dtype=np.uint8) for _ in socks]
        self.pool = ThreadPoolExecutor(len(socks), thread_name_prefix="mig-chan")
        self.lock = threading.Lock()

    def send_pass(self, number: int, mask: npt.NDArray[np.bool_], final: bool) -> RunCounts:
        run_pages = max(1, RUN_BYTES // self.ram.page_size)
        starts, lengths = page_runs(np.flatnonzero(mask), run_pages)
        dealt = deal_runs(starts, lengths, len(self.socks))
        futures = [self.pool.submit(self._send, i, number, runs, final)
                   for i, runs in enumerate(dealt)]
        try:
            while True:
                done, pending = wait(futures, timeout=POLL_S, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
                if not pending:
                    break
                self.check()
                self.progress()
        except BaseException:
            self.shutdown()  # unblock the other channels' sends
            wait(futures)
            raise
        total = RunCounts()
        for f in futures:
            total.add(f.result())
        return total

    def _send(self, i: int, number: int, runs: list[tuple[int, int]], final: bool
              ) -> RunCounts:  # fmt: skip
        sock, writer, counts = self.socks[i], self.writers[i], RunCounts()
        # the guest is paused for the final pass: its pages cannot change under the send
        for bufs in encode_runs(writer, self.ram, number, runs, self.bounces[i], counts,
                                batch_bytes=BATCH_BYTES, snapshot=not final):
            self._pace()
            if self.corrupt is not None and i == 0:
                bufs, self.corrupt = apply(self.corrupt, "active", bufs), None
            sent = send_buffers(sock, bufs, self.on_stall)
            with self.lock:
                self.session.channel_bytes += sent
                self.session.stats.ram_transferred = self.session.bytes_out
            if self.cut == i and number == 1:
                raise CutConnection(f"injected fault cut-channel:{i}")
        sent = send_buffers(sock, [writer.sync(number, final=final)], self.on_stall)
        with self.lock:
            self.session.channel_bytes += sent
        return counts

    def _pace(self) -> None:
        """The bandwidth cap (``max_bandwidth_mib``) holds for all channels together."""
        delay = self.session.pacing_delay()
        while delay > 0:
            self.check()
            time.sleep(min(delay, POLL_S))
            delay = self.session.pacing_delay()

    def in_flight_bytes(self) -> int:
        """Unsent and unacknowledged bytes in the channels' send queues (and, for each
        non-empty one, the destination's full receive buffer)."""
        total = 0
        for sock in self.socks:
            with contextlib.suppress(OSError, ValueError):
                raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                queued = int.from_bytes(raw, sys.byteorder, signed=True)
                total += queued + RECEIVE_BUFFER if queued > 0 else 0
        return total

    def shutdown(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.shutdown()
        self.pool.shutdown(wait=True)
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()


# --- destination -------------------------------------------------------------------------

_groups: dict[str, ChannelGroup] = {}
_groups_lock = threading.Lock()


def accept(conn: socket.socket, addr: Any, hello: dict[str, Any],
           refuse: Callable[[socket.socket, Any, str], None]) -> None:  # fmt: skip
    """A ``channel`` hello from the listener: hand the connection to its migration's
    group (the token is the one its main connection claimed), or refuse it."""
    token, index = hello.get("token"), hello.get("index")
    with _groups_lock:
        group = _groups.get(token) if isinstance(token, str) else None
    why = "unknown migration token for a data channel" if group is None else \
        group.attach(index, conn)  # fmt: skip
    if why:
        refuse(conn, addr, why)
        with contextlib.suppress(OSError):
            conn.close()


class ChannelGroup:
    """The destination's data channels of one migration (see the module docstring)."""

    def __init__(self, token: str, count: int, ram: GuestRam,
                 wake: Callable[[], None]) -> None:  # fmt: skip
        if not 1 <= count <= MAX_CHANNELS:
            raise ValueError(f"{count} data channels (1 to {MAX_CHANNELS})")
        self.token, self.count, self.ram, self.wake = token, count, ram, wake
        # no timeout at the barrier: a channel waits there while the others still move
        # their part of a (possibly bandwidth-capped) pass; each of them is bounded by
        # its socket's timeout, and a failure aborts the barrier
        self.barrier = threading.Barrier(count)
        #: when a channel last received something (the main connection is quiet meanwhile)
        self.last = time.monotonic()
        self.readers: dict[int, ChannelReader] = {}
        self.conns: dict[int, socket.socket] = {}
        self.threads: list[threading.Thread] = []
        self.finished = 0
        self.error = ""
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.closed = False
        with _groups_lock:
            _groups[token] = self

    def attach(self, index: object, conn: socket.socket) -> str:
        """Take channel ``index``'s connection: '' or why it is refused."""
        with self.lock:
            if self.closed or self.error:
                return "the migration of this data channel is over"
            if not isinstance(index, int) or isinstance(index, bool) \
                    or not 0 <= index < self.count:  # fmt: skip
                return f"data channel index {index!r} outside [0, {self.count})"
            if index in self.conns:
                return f"data channel {index} is already connected"
            self.conns[index] = conn
            reader = self.readers[index] = ChannelReader(index, self.ram.npages,
                                                         self.ram.page_size)
            t = threading.Thread(target=self._run, args=(index, conn, reader),
                                 name=f"mig-chan-{index}", daemon=True)
            self.threads.append(t)
        t.start()
        return ""

    def _run(self, i: int, conn: socket.socket, reader: ChannelReader) -> None:
        try:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER // 2)
            conn.settimeout(IDLE_TIMEOUT_S)
            send_frame(conn, "welcome", channel=i)
            self._receive(conn, reader)
        except threading.BrokenBarrierError:
            self.fail(f"data channel {i}: another channel failed")
        except VmferryError as exc:
            self.fail(f"data channel {i}: {type(exc).__name__}: {exc}")
        except OSError as exc:
            self.fail(f"data channel {i}: connection lost: {exc.strerror or exc}")
        except Exception as exc:
            log.exception("data channel %d", i)
            self.fail(f"data channel {i}: internal error: {type(exc).__name__}: {exc}")

    def _receive(self, conn: socket.socket, reader: ChannelReader) -> None:
        head = bytearray(HEADER_SIZE)
        ram = self.ram
        while not reader.finished:
            _recv_exact_into(conn, memoryview(head), "a data channel header")
            if self.error:
                return
            self.last = time.monotonic()
            ev = reader.header(head)
            if isinstance(ev, Pages):
                view = ram.receive_view(ev.first, ev.count)
                _recv_exact_into(conn, view, "page data")
                reader.payload(view)
                ram.received(ev.first, ev.count)
            elif isinstance(ev, Zero):
                ram.zero_pages(ev.first, ev.count)
            elif isinstance(ev, Sync) and not ev.final:
                self.barrier.wait()  # pass k+1 only after every channel finished pass k
        with self.lock:
            self.finished += 1
            if self.finished == self.count:
                self.done.set()

    def fail(self, reason: str) -> None:
        with self.lock:
            if self.error or self.closed:
                return
            self.error = reason
        log.warning("incoming migration: %s", reason)
        self.barrier.abort()
        self._shutdown()
        self.wake()

    def wait_done(self, bound_s: float, check: Callable[[], None]) -> None:
        """Until every channel delivered its final pass; PeerError if one failed, the
        channels never connected, or nothing finished within ``bound_s``."""
        end = time.monotonic() + bound_s
        while not self.done.wait(0.05):
            if self.error:
                raise PeerError(self.error, "receiving stream")
            check()
            if time.monotonic() > end:
                raise PeerError(f"the data channels did not finish within {bound_s:g} s "
                                f"({len(self.conns)} of {self.count} connected, "
                                f"{self.finished} finished)", "receiving stream")
        if self.error:
            raise PeerError(self.error, "receiving stream")

    def active_within(self, seconds: float) -> bool:
        """Whether a channel received something in the last ``seconds``."""
        return not self.error and time.monotonic() - self.last < seconds

    def totals(self) -> tuple[int, int]:
        """Pages and zero pages received over the channels."""
        return (sum(r.pages_received for r in self.readers.values()),
                sum(r.zero_pages_received for r in self.readers.values()))

    def _shutdown(self) -> None:
        with self.lock:
            conns = list(self.conns.values())
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop every channel thread (they write into guest memory: before that memory
        may go) and close the connections."""
        with _groups_lock:
            _groups.pop(self.token, None)
        with self.lock:
            self.closed = True
        self.barrier.abort()
        self._shutdown()
        for t in list(self.threads):
            t.join()
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.close()


def _recv_exact_into(sock: socket.socket, view: memoryview, what: str) -> None:
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise PeerError(f"connection closed while reading {what}")
        got += k


def dial_channels(
    dial: Callable[[], socket.socket], token: str, count: int, on_stall: OnStall
) -> list[socket.socket]:
    """Open ``count`` data channels (``dial()`` gives a connected socket) and wait for
    each one's welcome; PeerError if the destination refuses one."""
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            sock = dial()
            socks.append(sock)
            send_frame(sock, "channel", on_stall=on_stall, token=token, index=i, of=count)
        for i, sock in enumerate(socks):
            reply = recv_frame(sock, on_stall)
            if reply.get("type") != "welcome":
                raise PeerError(f"destination refused data channel {i}: "
                                f"{reply.get('reason', reply)}", "handshake")
    except BaseException:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return socks

