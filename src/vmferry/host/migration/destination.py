"""The destination's migration worker and the listener that hands connections to it.

The listener's handshake gate (:func:`~vmferry.host.transport.serve_handshakes`) reads
each connection's first frame into a destination
:class:`~vmferry.migration.channel.Connection` and hands it over:

* HELLO: a migration.  The one-time token is claimed and the stream version checked
  (REJECT with a typed status if either is wrong), then WELCOME; DATA frames go straight
  into the stream decoder (``Channel.receive_stream``), STREAM_END ends the stream, the
  VM is loaded (nothing runs), LOADED carries the ack and digests, and only COMMIT lets
  the VM run here: its job is persisted ``completed`` before RESUMED goes out;
* ABORT carrying a token: the source refused at pre-flight; the reservation is dropped.

Any failure before COMMIT discards the staging VM and sends ERROR with a typed status
(the error's kind, the step, the message), which the source raises as the same class.
Every wait is bounded and sees the host shutting down and an operator's cancel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from typing import Any

from vmferry.errors import ConfigError, MigrationCancelled, MigrationError, PeerError, VmferryError
from vmferry.host import datachannels
from vmferry.host.clocks import MonotonicClock
from vmferry.host.migration.common import (
    HELLO_TIMEOUT_S,
    IDLE_TIMEOUT_S,
    RECEIVE_BUFFER,
    MigrationHost,
)
from vmferry.host.populate import Populator
from vmferry.host.records import Job
from vmferry.host.states import JobStatus
from vmferry.host.tls import explain
from vmferry.host.transport import Channel, SocketLink, refusal, serve_handshakes
from vmferry.machine.vm import load_definition
from vmferry.migration.channel import (
    Abort,
    Closed,
    Commit,
    Connection,
    ErrorKind,
    Event,
    Hello,
    Loaded,
    Resumed,
    StreamEnd,
    SwitchoverAck,
    Welcome,
)
from vmferry.migration.channel import Status as Why
from vmferry.migration.channel.frames import LIVE_PAGES_MINOR, SWITCHOVER_ACK_MINOR
from vmferry.migration.destination import DestinationSession, describe_failure
from vmferry.migration.stream import MAJOR, DeviceChunk, StreamDecoder

log = logging.getLogger("vmferry.host.migration")

#: how long a destination that failed reads what the source still sends, so that its
#: ERROR frame is not lost to a reset
DRAIN_S = 1.0
#: job writes timed before the stream (``DestinationWorker._timed_saves``)
PERSIST_SAMPLES = 3


def serve_incoming(daemon: MigrationHost, listener: socket.socket) -> None:
    """The migration listener: first frames are read by the handshake gate (one thread,
    an overall deadline); a connection gets its worker thread only once its HELLO (or a
    pre-flight ABORT) arrived."""

    def on_hello(conn: socket.socket, addr: Any, channel: Connection,
                 first: Hello | Abort) -> None:  # fmt: skip
        worker = DestinationWorker(daemon, Channel(SocketLink(conn), channel), addr, first)
        threading.Thread(target=worker.run, name=f"mig-dst-{addr[1]}", daemon=True).start()

    def on_refuse(conn: socket.socket, addr: Any, reason: str,
                  channel: Connection | None) -> None:  # fmt: skip
        ch = Channel(SocketLink(conn), channel) if channel is not None else None
        refuse_connection(daemon, ch, addr, reason)
        with contextlib.suppress(OSError):
            conn.close()

    def tls_error(exc: BaseException, addr: Any) -> str:
        return explain(exc, f"{addr[0]}:{addr[1]}", server=True)

    tls = daemon.tls.server_context() if daemon.tls is not None else None
    serve_handshakes(listener, lambda: daemon.stopping, on_hello, on_refuse, tls=tls,
                     tls_error=tls_error)


def refuse_connection(daemon: MigrationHost, ch: Channel | None, addr: Any, reason: str) -> None:
    """Log a refused migration connection (and record it) and tell the peer why: a
    REJECT with a typed status, where the peer speaks the channel."""
    msg = f"refused migration connection from {addr[0]}:{addr[1]}: {reason}"
    log.warning(msg)
    daemon.store.log("refused", msg)
    if ch is not None:
        if isinstance(ch.link, SocketLink):
            with contextlib.suppress(OSError):
                ch.link.sock.setblocking(True)
        ch.send_failure(refusal(reason))


class DestinationWorker:
    """The destination's side of one connection (see the module docstring)."""

    def __init__(self, daemon: MigrationHost, ch: Channel, addr: Any,
                 first: Hello | Abort) -> None:  # fmt: skip
        self.daemon, self.ch, self.addr = daemon, ch, addr
        self.first = first
        self.session: DestinationSession | None = None
        self.job: Job | None = None
        self.step = "handshake"
        self.populator: Populator | None = None
        #: RAM over parallel data channels (their port is in the job's progress)
        self.channels: datachannels.ChannelGroup | None = None
        #: the staging VM, built at the handshake; whether the session took it
        self.staging: Any = None
        self._staging_used = False
        #: the bound on a source that makes no progress, seconds
        self.idle_s = HELLO_TIMEOUT_S

    def run(self) -> None:
        try:
            hello = self._handshake()
            if hello is not None:
                self._receive(hello)
        except (VmferryError, OSError) as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("incoming migration from %s", self.addr)
            self._fail(exc)
        finally:
            self._close_channels()
            if self.populator is not None:
                self.populator.stop()
            if self.staging is not None and not self._staging_used:
                self.staging.close()  # built at the handshake, never used
            self.ch.link.close()

    def _close_channels(self) -> None:
        if self.channels is not None:
            self.channels.close()  # its threads stop writing before the RAM may go

    # --- bounded waits -----------------------------------------------------------------

    def _on_stall(self, seconds: float) -> None:
        if self.daemon.stopping:
            raise PeerError("destination host is shutting down", self.step)
        if self.job is not None and self.job.cancel.is_set():
            raise MigrationCancelled("cancelled by the operator on the destination", self.step)
        if self.channels is not None:
            self.channels.check(self.step)
            # RAM may be moving over the data channels while the main one is quiet
            if self.channels.active_within(self.idle_s):
                return
        if seconds > self.idle_s:
            raise PeerError(f"the source sent nothing for {seconds:.1f} s", self.step)

    # --- the exchange ------------------------------------------------------------------

    def _handshake(self) -> Hello | None:
        first = self.first
        inc = self.daemon.claim_token(first.token)
        if inc is None:
            if isinstance(first, Hello):
                self._refuse("unknown or expired migration token")
            return None
        self.job = self.daemon.get_job(inc.job_id)
        if isinstance(first, Abort):  # the source refused at pre-flight
            self.job.move(JobStatus.FAILED, "pre-flight", first.status.message)
            self.daemon.save_job(self.job)
            return None
        if first.stream_version[0] != MAJOR:
            major, minor = first.stream_version
            self._refuse(f"stream version {major}.{minor} not supported (this host reads "
                         f"{MAJOR}.x)")  # fmt: skip
            self.job.move(JobStatus.FAILED, "handshake",
                          f"the source sends stream version {major}.{minor}")
            self.daemon.save_job(self.job)
            return None
        self.session = DestinationSession(
            MonotonicClock(), verify=inc.verify,
            check_config=self._check_approved(inc.vm, inc.definition),
            factory=self._build_staging,
            switchover_ack=first.minor >= SWITCHOVER_ACK_MINOR,
        )
        # The staging VM (for KVM guests: its VM and memory slot) is built now, before
        # the first byte of data: the stream's configuration must equal this definition.
        self.staging = self.daemon.build_vm({**inc.definition, "fill": "zero"})
        self.populator = Populator(self.staging.ram)
        if isinstance(self.ch.link, SocketLink):
            with contextlib.suppress(OSError):
                self.ch.link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                             RECEIVE_BUFFER // 2)  # fmt: skip
            host = self.ch.link.sock.getsockname()[0]
            tls = self.daemon.tls.server_context() if self.daemon.tls is not None else None
            self.channels = datachannels.ChannelGroup(
                first.token, self.staging.ram, host, tls,
                live=first.minor >= LIVE_PAGES_MINOR)  # fmt: skip
            self.job.progress["data_port"] = self.channels.port
            self._device_over_channels()
        self.ch.send(Welcome(self.daemon.name), self._on_stall)
        self.idle_s = IDLE_TIMEOUT_S
        self.job.move(JobStatus.ACTIVE, "receiving stream")
        self._timed_saves()
        return first

    def _timed_saves(self) -> None:
        """Write the job :data:`PERSIST_SAMPLES` times, each timed, before the first byte
        of data (a quiet moment): the source reads the times (``progress.persist_ms``)
        for the downtime it predicts, which has this host's writes with the guest paused
        in it (the resume step, the completed status, the VM's record)."""
        assert self.job is not None
        samples: list[float] = []
        for _ in range(PERSIST_SAMPLES):
            self.job.progress["persist_ms"] = samples
            t0 = time.monotonic()
            self.daemon.save_job(self.job)
            samples = [*samples, round((time.monotonic() - t0) * 1e3, 3)]
        self.job.progress["persist_ms"] = samples

    def _build_staging(self, definition: Any) -> Any:
        """The staging VM built at the handshake (its RAM faulted in from a thread while
        the stream arrives); the stream's configuration was checked against it."""
        if self.staging is not None:
            self._staging_used = True
            return self.staging
        vm = self.daemon.build_vm(definition)
        self.populator = Populator(vm.ram)
        return vm

    @staticmethod
    def _check_approved(expected: str, approved: dict[str, Any]) -> Any:
        """The stream's VM must be exactly the definition this host approved at
        /v1/incoming (and checked against its resources): the same name and the same
        memory, vCPUs, devices and every other key."""
        want = json.dumps(approved, sort_keys=True)

        def check(config: Any) -> None:
            if not isinstance(config, dict) or config.get("name") != expected:
                name = config.get("name") if isinstance(config, dict) else None
                raise ConfigError(f"stream carries VM {name!r}, expected {expected!r}")
            got = json.dumps(load_definition(config).to_dict(), sort_keys=True)
            if got != want:
                raise ConfigError(f"stream carries a definition of VM {expected} that differs "
                                  "from the one this host approved")

        return check

    def _refuse(self, reason: str) -> None:
        refuse_connection(self.daemon, self.ch, self.addr, reason)

    def _unexpected(self, ev: Event | Closed, waiting_for: str) -> MigrationError:
        """What an event other than the awaited one means here."""
        if isinstance(ev, Abort):  # the source gave up (a cancel, a mismatch, ...)
            cls = MigrationCancelled if ev.status.kind is ErrorKind.CANCELLED else MigrationError
            return cls(f"source aborted: {ev.status.message}", self.step)
        return PeerError(f"expected {waiting_for}, got {type(ev).__name__.upper()}", self.step)

    def _on_record(self, rec: Any) -> None:
        assert self.session is not None
        self.session.receive(rec)
        if isinstance(rec, DeviceChunk) and self.job is not None:
            # the source reads it with its round trips, for the device-load prediction
            self.job.progress["device_loads"] = self.session.device_load_report()
        self.step = f"receiving stream (pass {self.session.passes + 1})"
        self._send_switchover_ack()

    def _device_over_channels(self) -> None:
        """A source of channel 1.2 sends the devices' stop-copy state over the data
        channels: their threads load it into the staging VM's devices, in order."""
        if self.channels is not None and self.session is not None \
                and self._peer_minor() >= SWITCHOVER_ACK_MINOR:  # fmt: skip
            self.channels.on_device = self.session.load_channel_device

    def _send_switchover_ack(self) -> None:
        """Every device's pre-copy initial data is loaded: SWITCHOVER_ACK, once (the
        source does not stop the guest before it)."""
        assert self.session is not None
        ack = self.session.take_switchover_ack()
        if ack is not None:
            self.ch.send(SwitchoverAck(ack), self._on_stall)
            log.info("incoming job %s: devices' initial data loaded (%d bytes in %.1f ms), "
                     "switchover acknowledged", self.job.id if self.job else "?",
                     ack["device_bytes"], ack["load_ms"])  # fmt: skip

    def _receive(self, hello: Hello) -> None:
        assert self.session is not None and self.job is not None
        decoder = StreamDecoder()
        self.step = "receiving stream"
        end = self.ch.receive_stream(decoder, self._on_record, self._on_stall)
        if not isinstance(end, StreamEnd):
            raise self._unexpected(end, "STREAM_END")
        decoder.eof()  # STREAM_END before the stream's END record: a truncated stream
        t_wait = time.monotonic()
        if self.channels is not None and self.channels.connected:
            self.channels.open_device()  # the main stream's device chunks are all in
            self.channels.wait_done(IDLE_TIMEOUT_S, lambda: self._on_stall(0.0))
            pages, zero = self.channels.totals()
            self.session.pages_received += pages
            self.session.zero_pages_received += zero
        self._close_channels()
        self.step = "load"
        if self.populator is not None:
            self.populator.stop()
        t_drained = time.monotonic()
        vm = self.session.vm
        assert vm is not None
        ack = self.session.finish(start=False)
        # after the stream's END: the data channels' last bytes, and the channel and
        # populate threads stopped (part of load_ms, reported apart: it is receive backlog)
        ack["channels_wait_ms"] = (t_drained - t_wait) * 1e3
        self.ch.send(Loaded(ack), self._on_stall)
        self.step = "awaiting commit"
        commit = self.ch.next_event(self._on_stall)
        if not isinstance(commit, Commit):  # ABORT: the source found our state differs
            raise self._unexpected(commit, "COMMIT")
        # After COMMIT.  The job is persisted "completed" once the VM runs here and
        # before RESUMED goes out, so a source that never gets RESUMED can learn the
        # outcome from this host's control API; "failed" always means it does not run here.
        self.step = "resume"
        self.job.step = "resume"
        self.daemon.save_job(self.job)
        t0 = time.monotonic()
        post_load = self.daemon.adopt_loaded(self.session, hello.runstate != "paused")
        self.job.move(JobStatus.COMPLETED, "resumed")
        self.job.stats = {
            "ack": {k: v for k, v in ack.items() if k != "digests"},
            "passes": self.session.passes,
        }
        self.daemon.save_job(self.job)
        log.info("incoming VM %s resumed (job %s)", vm.name, self.job.id)
        with contextlib.suppress(OSError):
            self.ch.send(Resumed({"resume_ms": (time.monotonic() - t0) * 1e3,
                                  "post_load": post_load}), self._on_stall)  # fmt: skip

    def _fail(self, exc: BaseException) -> None:
        # The link's own failures; any other OSError (a full disk writing the job or the
        # VM's record) is this host's problem and the source is told so.
        link_lost = isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError)
        reason = (f"connection lost: {exc.strerror or exc}"
                  if link_lost and isinstance(exc, OSError) else describe_failure(exc))  # fmt: skip
        self._close_channels()
        if self.populator is not None:
            self.populator.stop()
        if self.job is not None and self.job.status is JobStatus.COMPLETED:
            log.warning("incoming VM %s: %s (after it resumed here)", self.job.vm, reason)
            return
        if self.session is not None:
            self.session.abort()
        log.warning("incoming migration failed at %s: %s", self.step, reason)
        if self.job is not None and not self.job.status.finished:
            self.job.move(JobStatus.FAILED, self.step, reason)
            try:
                self.daemon.save_job(self.job)
            except OSError as save_exc:  # the source still learns why, below
                log.error("incoming job %s not saved: %s", self.job.id, save_exc)
        if link_lost:
            return  # the connection is gone: nothing can be said on it
        # ERROR: discarded, will never resume -- the same error class on the source
        try:
            self.ch.send_failure(Why.from_exception(exc, self.step).for_peer(self._peer_minor()))
        except OSError:
            return  # the connection went too
        if isinstance(self.ch.link, SocketLink):
            with contextlib.suppress(OSError):
                self.ch.link.sock.shutdown(socket.SHUT_WR)
        self._drain()

    def _peer_minor(self) -> int:
        """The channel minor version the source speaks (its HELLO's)."""
        return self.first.minor if isinstance(self.first, Hello) else 0

    def _drain(self) -> None:
        """Read and drop what the source still sends, so our ERROR frame is not lost
        to a reset; give up after :data:`DRAIN_S`."""
        end = time.monotonic() + DRAIN_S
        buf = memoryview(bytearray(1 << 16))

        def bounded(seconds: float) -> None:
            if time.monotonic() > end:
                raise TimeoutError("drained long enough")

        with contextlib.suppress(OSError):
            while time.monotonic() < end and self.ch.link.recv_into(buf, bounded):
                pass

