"""Parallel data channels for guest RAM: the threads that move the bytes.

The wire format, its checks and the ordering rule live in
:mod:`vmferry.migration.multichannel` (sans-IO); this module only opens connections,
runs one thread per channel and turns every way a channel can fail into a failure of the
whole migration.

* The source (:class:`ChannelSink`) dials ``N`` connections to the port the
  destination's channel group opened for this migration (named in the destination's job,
  ``progress.data_port``), each opened with a channel hello that carries the migration's
  one-time token and the channel's index (over TLS when this host serves TLS, as the
  main connection).  For every pass the session hands it the dirty mask; it deals the
  page runs round-robin to the channels, whose threads find
  zero pages, snapshot and checksum the others and ``sendmsg`` them, then send SYNC.
  To a destination of channel protocol 1.3, the runs of pass 1 go without the snapshot,
  straight from guest memory, as LIVE records; after that pass's SYNC each channel
  thread reads the destination's OWED report (the LIVE records that arrived torn) and
  the next pass sends those pages again (see
  :mod:`vmferry.migration.multichannel`).  Later passes carry the pages the guest wrote
  during the one before -- those it is likely to write again, which would tear -- and
  keep the snapshot.
* The destination (:class:`ChannelGroup`) receives every channel's page data straight
  into the staging VM's memory (``recv_into`` a view of the page run: no intermediate
  buffer), verifies each record, and keeps the per-pass barrier: no channel applies pass
  ``k + 1`` before every channel finished pass ``k``.  A torn LIVE record's pages are
  owed until a verified record covers them; each channel answers a pass that carried
  LIVE records with its OWED report; pages still owed at the end fail the migration.

With a destination of channel protocol 1.2, the devices' stop-copy state travels on the
channels too: the source session stages it before the final pass
(:meth:`ChannelSink.stage_device`), each channel sends its share of the chunks after its
final pages and before its final SYNC, and the destination's channel threads put the
chunks back in order (:class:`~vmferry.migration.multichannel.DeviceReassembler`) and load
each into its device as soon as it is next (``on_device``), while the other channels
still receive.

A cut, a stall or a bad record in any channel fails the migration: the source's session
fails (its guest resumes); on the destination the main worker sees the group's error at
its next poll and discards the staging VM after every channel thread has stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np
import numpy.typing as npt

from vmferry.errors import MalformedRecord, PeerError, VmferryError
from vmferry.host.clocks import pace
from vmferry.host.faults import CutConnection, Fault, apply
from vmferry.host.transport import OnStall, send_buffers, send_queued
from vmferry.machine.handlers import DeviceData
from vmferry.machine.ram import GuestRam
from vmferry.migration.channelsend import (
    RunCounts,
    deal_runs,
    deal_scattered,
    encode_runs,
    encode_scatter,
    split_scattered,
)
from vmferry.migration.multichannel import (
    HEADER_SIZE,
    HELLO,
    LIVE_CHECK_SIZE,
    MAX_RECORD_BYTES,
    MAX_SCATTER_PAGES,
    ChannelReader,
    ChannelWriter,
    Device,
    DeviceReassembler,
    Pages,
    Scatter,
    Sync,
    Zero,
    channel_hello,
    deal_device,
    device_records,
    parse_channel_hello,
)
from vmferry.migration.owed import (
    OwedPages,
    OwedReportReader,
    add_owed,
)
from vmferry.migration.source import SourceSession

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
#: how long a channel's connection may take to say which migration it belongs to
HELLO_TIMEOUT_S = 10.0
#: the destination's answer to a channel hello it accepted
ACCEPTED = b"\x01"
#: how often the source's driving thread looks up (cancel) while the channels send
POLL_S = 0.2
#: the passes whose runs go as LIVE records (to a destination of channel protocol 1.3):
#: pass 1 only -- later passes carry pages the guest has just written, which tear often
LIVE_PASSES = 1
#: how long a channel waits for the destination's OWED report of a pass
REPORT_TIMEOUT_S = IDLE_TIMEOUT_S


# --- source ------------------------------------------------------------------------------


class ChannelSink:
    """The source's data channels (a :class:`~vmferry.migration.channelsend.RamSink`)."""

    def __init__(
        self,
        socks: list[socket.socket],
        session: SourceSession,
        *,
        on_stall: OnStall,
        check: Callable[[], None],
        progress: Callable[[], None] = lambda: None,
        fault: Fault | None = None,
        live: bool = False,
    ) -> None:
        self.socks = socks
        #: the destination speaks channel protocol 1.3: LIVE records, OWED reports
        self.live = live
        self.session = session
        self.ram: GuestRam = session.vm.ram
        self.on_stall = on_stall
        self.check = check
        self.progress = progress
        self.cut = int(fault.action) if fault is not None and fault.phase == "cut-channel" \
            else None  # fmt: skip
        #: ``cut-device-channel:N``: channel N breaks while it sends device state
        self.cut_device = int(fault.action) if fault is not None \
            and fault.phase == "cut-device-channel" else None  # fmt: skip
        #: the pass in which the cut falls (after a SCATTER record from pass 2 on)
        self.cut_pass = fault.at_pass if fault is not None else 1
        #: ``active:corrupt`` damages channel 0's first batch (after its checksums)
        self.corrupt = fault if fault is not None and fault.phase == "active" \
            and fault.action == "corrupt" else None  # fmt: skip
        self.writers = [ChannelWriter(i, self.ram.page_size) for i in range(len(socks))]
        bounce = max(BOUNCE_BYTES, 2 * RUN_BYTES, 2 * self.ram.page_size)
        self.bounces = [np.empty(bounce, dtype=np.uint8) for _ in socks]
        self.pool = ThreadPoolExecutor(len(socks), thread_name_prefix="mig-chan")
        self.lock = threading.Lock()
        #: stop-copy device chunks dealt to the channels, sent in the final pass
        self.device_plan: list[list[tuple[int, DeviceData]]] = [[] for _ in socks]
        self.reports = [OwedReportReader(i, self.ram.npages, self.ram.page_size)
                        for i in range(len(socks))]  # fmt: skip
        #: owed ranges (pass, first, count) the next pass sends again (:meth:`owed_pages`)
        self.owed: list[tuple[int, int, int]] = []
        #: LIVE records sent, and those the destination reported torn
        self.live_records = 0
        self.torn_records = 0

    def owed_pages(self, dirty: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """``dirty`` and the pages of the LIVE records the destination reported torn in
        the pass just sent (its OWED reports are in: each channel read its own before
        :meth:`send_pass` returned); ChecksumMismatch if one of them has no dirty page."""
        with self.lock:
            owed, self.owed = self.owed, []
        return add_owed(dirty, owed)

    def send_pass(self, number: int, mask: npt.NDArray[np.bool_], final: bool) -> RunCounts:
        run_pages = max(1, RUN_BYTES // self.ram.page_size)
        starts, lengths, scattered = split_scattered(np.flatnonzero(mask), run_pages)
        dealt = deal_runs(starts, lengths, len(self.socks))
        lists = deal_scattered(scattered, len(self.socks))
        futures = [self.pool.submit(self._send, i, number, runs, lists[i], final)
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

    def _send(self, i: int, number: int, runs: list[tuple[int, int]],
              lists: list[npt.NDArray[np.int64]], final: bool) -> RunCounts:  # fmt: skip
        sock, writer, counts = self.socks[i], self.writers[i], RunCounts()
        # the guest is paused for the final pass: its pages cannot change under the send;
        # a destination of channel 1.3 takes pass 1's runs live (a torn one comes back)
        # -- except a first batch the ``active:corrupt`` fault damages, which must fail
        live = self.live and not final and number <= LIVE_PASSES \
            and not (self.corrupt is not None and i == 0)  # fmt: skip
        report = self.reports[i] if live else None
        batches = itertools.chain(
            encode_runs(writer, self.ram, number, runs, self.bounces[i], counts,
                        batch_bytes=BATCH_BYTES, snapshot=not final and not live,
                        live=report),
            encode_scatter(writer, self.ram, number, lists, self.bounces[i], counts,
                           batch_bytes=BATCH_BYTES))
        for bufs in batches:
            self._pace()
            if self.corrupt is not None and i == 0:
                bufs, self.corrupt = apply(self.corrupt, "active", bufs), None
            sent = send_buffers(sock, bufs, self.on_stall)
            with self.lock:
                self.session.channel_bytes += sent
                self.session.stats.ram_transferred = self.session.bytes_out
            if self.cut == i and number == self.cut_pass and (number == 1
                                                              or writer.scatter_records):
                raise CutConnection(f"injected fault cut-channel:{i}"
                                    + (f":{number}" if number > 1 else ""))
        if final:
            self._send_device(i, number)
        sent = send_buffers(sock, [writer.sync(number, final=final)], self.on_stall)
        with self.lock:
            self.session.channel_bytes += sent
        if report is not None and report.due(number):
            self._take_report(i, number)
        return counts

    def _take_report(self, i: int, number: int) -> None:
        """The destination's OWED report of pass ``number`` on channel ``i`` (it has
        verified everything of that pass on the channel then): its ranges go again in
        the next pass.  Bounded by :data:`REPORT_TIMEOUT_S`."""
        report = self.reports[i]
        with self.lock:
            self.live_records += len(report.sent[number])
        head = bytearray(HEADER_SIZE)
        self._recv_report(i, number, memoryview(head))
        body = bytearray(report.header(head))
        if body:
            self._recv_report(i, number, memoryview(body))
        _, ranges = report.ranges(body)
        with self.lock:
            self.owed += [(number, first, count) for first, count in ranges]
            self.torn_records += len(ranges)
        if ranges:
            log.info("data channel %d: %d LIVE records of pass %d arrived torn; their "
                     "pages go again", i, len(ranges), number)  # fmt: skip

    def _recv_report(self, i: int, number: int, view: memoryview) -> None:
        sock = self.socks[i]
        sock.settimeout(POLL_S)
        end = time.monotonic() + REPORT_TIMEOUT_S
        got = 0
        while got < view.nbytes:
            try:
                k = sock.recv_into(view[got:])
            except TimeoutError:
                if time.monotonic() > end:
                    raise PeerError(f"data channel {i}: the destination sent no OWED report "
                                    f"of pass {number} within {REPORT_TIMEOUT_S:g} s",
                                    f"ram pass {number}") from None  # fmt: skip
                continue
            if k == 0:
                raise PeerError(f"data channel {i}: connection closed while reading the "
                                f"OWED report of pass {number}", f"ram pass {number}")
            got += k

    def stage_device(self, pieces: list[DeviceData]) -> None:
        """The devices' stop-copy chunks (a :class:`~vmferry.migration.devicestate.DeviceSink`):
        numbered in read order and dealt round-robin; each channel sends its share in the
        final pass, after its pages."""
        self.device_plan = deal_device(pieces, len(self.socks))

    def _send_device(self, i: int, number: int) -> None:
        """Channel ``i``'s share of the device chunks, in batches of about
        :data:`BATCH_BYTES` (views of the stopped devices' data: nothing is copied)."""
        sock, writer = self.socks[i], self.writers[i]
        plan, self.device_plan[i] = self.device_plan[i], []
        batch: list[tuple[int, DeviceData]] = []
        size = 0
        for k, (index, piece) in enumerate(plan):
            batch.append((index, piece))
            size += memoryview(piece.data).nbytes
            if size < BATCH_BYTES and k + 1 < len(plan):
                continue
            self._pace()
            sent = send_buffers(sock, device_records(writer, number, batch), self.on_stall)
            with self.lock:
                self.session.channel_bytes += sent
                self.session.stats.ram_transferred = self.session.bytes_out
            if self.cut_device == i:
                raise CutConnection(f"injected fault cut-device-channel:{i}")
            batch, size = [], 0

    def _pace(self) -> None:
        """The bandwidth cap (``max_bandwidth_mib``) holds for all channels together."""
        pace(self.session.pacing_delay, self.check)

    def in_flight_bytes(self) -> int:
        """Unsent and unacknowledged bytes in the channels' send queues.  (Unlike the
        main connection, a full destination receive buffer is not assumed: the channel
        threads there drain their sockets while the last pass is sent, and counting
        2 MiB a channel over-predicted the downtime 3-12x in the benchmark.)"""
        return sum(send_queued(sock) for sock in self.socks)

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


class ChannelGroup:
    """The destination's data channels of one migration (see the module docstring).

    It listens on a port of its own (``port``, on the migration listener's address, TLS
    when the host serves TLS), which the source learns from the destination's job
    (``progress.data_port``); a connection joins with a channel hello carrying the
    migration's token.  A wrong token, index or count closes the connection."""

    def __init__(self, token: str, ram: GuestRam, host: str,
                 tls: ssl.SSLContext | None = None, *, live: bool = False) -> None:  # fmt: skip
        self.token, self.ram, self.tls = token, ram, tls
        #: the source speaks channel protocol 1.3: LIVE records, OWED reports
        self.live = live
        #: pages of torn LIVE records not yet covered by a verified record (under ``lock``)
        self.owed = OwedPages(ram.npages)
        self.count = 0
        self.barrier: threading.Barrier | None = None
        self.readers: dict[int, ChannelReader] = {}
        self.conns: dict[int, socket.socket] = {}
        self.threads: list[threading.Thread] = []
        self.finished = 0
        self.error = ""
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.closed = False
        #: when a channel last received something (the main connection is quiet meanwhile)
        self.last = time.monotonic()
        #: where stop-copy device chunks go, in order (the destination session's loader);
        #: None: this migration takes none on the channels
        self.on_device: Callable[[DeviceData], None] | None = None
        self.reassembler = DeviceReassembler()
        self.device_lock = threading.Lock()
        #: chunks are loaded only once the main stream has ended (its pre-copy device
        #: chunks, which come before them, are all loaded then): until
        #: :meth:`open_device`, chunks that are next in order wait here
        self.device_open = False
        self._device_ready: list[DeviceData] = []
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(POLL_S)
        self.port: int = self.listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="mig-chan-accept",
                                          daemon=True)  # fmt: skip
        self._acceptor.start()

    @property
    def connected(self) -> bool:
        return self.count > 0

    def _accept(self) -> None:
        while not self.closed and not self.error and (not self.count
                                                      or len(self.conns) < self.count):
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                conn.settimeout(HELLO_TIMEOUT_S)
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                head = bytearray(HELLO.size)
                _recv_exact_into(conn, memoryview(head), "a channel hello")
                token, index, count = parse_channel_hello(head)
                why = self.attach(token, index, count, conn)
            except (OSError, VmferryError) as exc:
                why = str(exc)
            if why:
                log.warning("refused data channel from %s:%s: %s", addr[0], addr[1], why)
                with contextlib.suppress(OSError):
                    conn.close()

    def attach(self, token: str, index: int, count: int, conn: socket.socket) -> str:
        """Take channel ``index`` of ``count``: '' or why it is refused."""
        with self.lock:
            if self.closed or self.error:
                return "the migration of this data channel is over"
            if token != self.token:
                return "wrong migration token for a data channel"
            if self.count and count != self.count:
                return f"data channel {index} of {count}, the others said {self.count}"
            if index in self.conns:
                return f"data channel {index} is already connected"
            if not self.count:
                self.count = count
                # no timeout at the barrier: a channel waits there while the others still
                # move their part of a (possibly bandwidth-capped) pass; each of them is
                # bounded by its socket's timeout, and a failure aborts the barrier
                self.barrier = threading.Barrier(count)
            self.conns[index] = conn
            reader = self.readers[index] = ChannelReader(index, self.ram.npages,
                                                         self.ram.page_size, live=self.live)
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
            conn.sendall(ACCEPTED)  # the source uses the channel only once it has this
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
        check = bytearray(LIVE_CHECK_SIZE)
        ram = self.ram
        staging = _ScatterStaging()
        assert self.barrier is not None
        while not reader.finished:
            _recv_exact_into(conn, memoryview(head), "a data channel header")
            if self.error or self.closed:
                return
            self.last = time.monotonic()
            ev = reader.header(head)
            if isinstance(ev, Pages):
                if ev.live:  # the header's own check first: a damaged one fails at once
                    _recv_exact_into(conn, memoryview(check), "a LIVE record's header check")
                    reader.live_check(check)
                view = ram.receive_view(ev.first, ev.count)
                _recv_exact_into(conn, view, "page data")
                verified = reader.payload(view)
                ram.received(ev.first, ev.count)
                # a torn LIVE record's data stays, its pages owed until a verified copy
                # (the other channels of this pass carry other pages: only a previous
                # pass, behind the barrier, can have made these owed)
                if not verified or self.owed.count:
                    with self.lock:
                        if verified:
                            self.owed.covered(ev.first, ev.count)
                        else:
                            self.owed.owe(ev.first, ev.count)
            elif isinstance(ev, Zero):
                ram.zero_pages(ev.first, ev.count)
                if self.owed.count:
                    with self.lock:
                        self.owed.covered(ev.first, ev.count)
            elif isinstance(ev, Device):
                self._device(conn, reader, ev)
            elif isinstance(ev, Scatter):
                pages = _receive_scatter(conn, reader, ev, ram, staging)
                if self.owed.count:
                    with self.lock:
                        self.owed.covered_at(pages)
            elif isinstance(ev, Sync) and not ev.final:
                if reader.report is not None:  # the pass carried LIVE records here
                    self._report(conn, reader.report)
                self.barrier.wait()  # pass k+1 only after every channel finished pass k
        with self.lock:
            self.finished += 1
            if self.finished == self.count:
                self.done.set()

    def _report(self, conn: socket.socket, report: bytes) -> None:
        """The OWED report of the pass just finished on this channel, to the source."""
        conn.sendall(report)

    def _device(self, conn: socket.socket, reader: ChannelReader, ev: Device) -> None:
        """A device chunk: received, verified, and loaded into its device once every
        chunk before it was (whichever channel completes the run loads it)."""
        buf = bytearray(ev.length)
        _recv_exact_into(conn, memoryview(buf), "device state")
        index, piece = reader.device_payload(buf)
        if self.on_device is None:
            raise MalformedRecord("device state on a data channel of a migration that "
                                  "takes none there")  # fmt: skip
        with self.device_lock:
            ready = self.reassembler.offer(index, piece)
            if not self.device_open:
                self._device_ready += ready
                return
            for p in ready:
                self.on_device(p)

    def open_device(self) -> None:
        """The main stream ended (the caller's thread loaded all of it): load the device
        chunks that wait, and from now on each as soon as it is next in order."""
        with self.device_lock:
            self.device_open = True
            waiting, self._device_ready = self._device_ready, []
            if waiting and self.on_device is not None:
                for p in waiting:
                    self.on_device(p)

    def fail(self, reason: str) -> None:
        with self.lock:
            if self.error or self.closed:
                return
            self.error = reason
        log.warning("incoming migration: %s", reason)
        if self.barrier is not None:
            self.barrier.abort()
        self._shutdown()

    def check(self, step: str) -> None:
        """PeerError if a channel failed."""
        if self.error:
            raise PeerError(self.error, step)

    def wait_done(self, bound_s: float, check: Callable[[], None]) -> None:
        """Until every channel delivered its final pass; PeerError if one failed, the
        channels never connected, or nothing finished within ``bound_s``."""
        end = time.monotonic() + bound_s
        while not self.done.wait(0.05):
            self.check("receiving stream")
            check()
            if time.monotonic() > end:
                raise PeerError(f"the data channels did not finish within {bound_s:g} s "
                                f"({len(self.conns)} of {self.count or '?'} connected, "
                                f"{self.finished} finished)", "receiving stream")
        self.check("receiving stream")
        with self.device_lock:
            self.reassembler.check_complete()
        with self.lock:
            self.owed.check()  # a torn record's pages that never arrived verified

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
        may go) and close the connections and the port."""
        with self.lock:
            self.closed = True
        # shutdown wakes an accept() blocked in the acceptor thread at once; close alone
        # does not, and the join waited out the acceptor's poll (up to POLL_S) with the
        # guest paused whenever no channel had connected (RAM in the main connection)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.close()
        self._acceptor.join()
        if self.barrier is not None:
            self.barrier.abort()
        self._shutdown()
        for t in list(self.threads):
            t.join()
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.close()


class _ScatterStaging:
    """A channel thread's buffers for SCATTER records: the page list, and the page data
    (checked before it is stored: it goes to scattered pages, not one window)."""

    def __init__(self) -> None:
        self.index = bytearray(8 * MAX_SCATTER_PAGES)
        self.data: npt.NDArray[np.uint8] = np.empty(0, dtype=np.uint8)

    def pages(self, nbytes: int) -> npt.NDArray[np.uint8]:
        if self.data.size < nbytes:
            self.data = np.empty(min(max(nbytes, 1024 * 1024), MAX_RECORD_BYTES),
                                 dtype=np.uint8)  # fmt: skip
        return self.data[:nbytes]


def _receive_scatter(conn: socket.socket, reader: ChannelReader, ev: Scatter, ram: GuestRam,
                     staging: _ScatterStaging) -> npt.NDArray[np.int64]:  # fmt: skip
    """The rest of a SCATTER record: its page list, then (unless zeroed) its data,
    verified, then stored into the listed pages (returned)."""
    index = memoryview(staging.index)[: 8 * ev.count]
    _recv_exact_into(conn, index, "a page list")
    pages = reader.scatter_index(index)
    if ev.zero:
        ram.zero_pages_at(pages)
        return pages
    ps = ram.page_size
    data = staging.pages(ev.count * ps)
    _recv_exact_into(conn, data.data, "page data")
    reader.payload(data.data)
    ram.scatter_pages(pages, data.reshape(ev.count, ps))
    return pages


def _recv_exact_into(sock: socket.socket, view: memoryview, what: str) -> None:
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise PeerError(f"connection closed while reading {what}")
        got += k


def dial_channels(address: tuple[str, int], token: str, count: int,
                  tls: ssl.SSLContext | None) -> list[socket.socket]:  # fmt: skip
    """Open ``count`` data channels to a destination's channel port, each with its hello
    (TLS with ``tls``, a client context)."""
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.create_connection(address, timeout=HELLO_TIMEOUT_S)
            if tls is not None:
                try:
                    sock = tls.wrap_socket(sock)
                except BaseException:
                    sock.close()
                    raise
            socks.append(sock)
            sock.sendall(channel_hello(token, i, count))
        for i, sock in enumerate(socks):
            got = bytearray(1)
            _recv_exact_into(sock, memoryview(got), f"data channel {i}'s acceptance")
            if bytes(got) != ACCEPTED:
                raise PeerError(f"destination refused data channel {i}", "handshake")
    except BaseException:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return socks
