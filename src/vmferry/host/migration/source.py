"""The source's migration worker: one thread per job, driving the channel to the
destination (see docs/channel.md).

The exchange, on a :class:`~vmferry.host.transport.Channel`::

    HELLO -> ; <- WELCOME | REJECT {status}
    DATA ... STREAM_END ->          <- ERROR {status} at any time: fail, resume
    <- LOADED {ack, digests}        compare digests (verify); differ: ABORT, fail, resume
    persist commit_sent; COMMIT ->
    <- RESUMED {report}             completed: the husk is released
    <- ERROR {status}               the destination never resumes: the source resumes
    anything else after COMMIT      in doubt: ask the destination (_settle_after_commit)

A failure before COMMIT -- a cancel included -- tells the destination with ABORT.  Every
wait is bounded (:func:`~vmferry.host.migration.common.stall_bound_s` while the guest is
paused, ``ACTIVE_STALL_S`` while it runs) and looks at the job's cancel flag, which takes
effect in every phase before COMMIT; the daemon refuses a cancel after it.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from vmferry.errors import (
    ApiError,
    HostError,
    MigrationError,
    MigrationRefused,
    PeerError,
    RemoteChannelError,
    StreamError,
    VmferryError,
)
from vmferry.host import datachannels
from vmferry.host.client import HostClient
from vmferry.host.clocks import MonotonicClock, pace
from vmferry.host.faults import CutConnection, Fault, apply
from vmferry.host.files import Output
from vmferry.host.migration.ack import SwitchoverAckSide
from vmferry.host.migration.common import (
    ACTIVE_STALL_S,
    HELLO_TIMEOUT_S,
    STATS_EVERY_S,
    MigrationHost,
    ask_destination,
    ask_destination_outcome,
    destination_ok,
    dial,
    parse_params,
    remote_text,
    stall_bound_s,
    status_json,
)
from vmferry.host.migration.probes import LinkProbeSide
from vmferry.host.outcome import downtime_overrun
from vmferry.host.records import HostedVm, Job
from vmferry.host.runner import VmRunner
from vmferry.host.states import JobStatus, Runstate
from vmferry.host.tls import client_context, explain
from vmferry.host.transport import Channel, Link
from vmferry.migration.channel import (
    TERMINAL,
    Abort,
    Closed,
    Commit,
    Connection,
    Error,
    ErrorKind,
    Event,
    Hello,
    Loaded,
    Reject,
    Resumed,
    Role,
    Rules,
    StreamEnd,
    Verdict,
    Welcome,
)
from vmferry.migration.channel import Status as Why
from vmferry.migration.channel.frames import LIVE_PAGES_MINOR
from vmferry.migration.context import Status
from vmferry.migration.destination import describe_failure
from vmferry.migration.prediction import FixedCosts
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import MAJOR, MINOR
from vmferry.migration.stream.records import Buffer

log = logging.getLogger("vmferry.host.migration")


#: opens the connection to the destination's listener: (address, timeout) -> link
Dialer = Callable[[tuple[str, int], float], Link]


def start_source_job(
    daemon: MigrationHost, hosted: HostedVm, job: Job, prev_state: str
) -> Job:
    """Start the source side of ``job``; the daemon has already checked the parameters
    and marked the VM ``migrating`` (one step with the check, so a second request
    meanwhile gets 409 naming this job).  If anything fails before the worker runs (the
    stream file, the destination refuses or cannot be reached), the job is forgotten, the
    VM is given back in ``prev_state`` and the error propagates: a refused request leaves
    nothing behind."""
    tee: Output | None = None
    try:
        params, fault = parse_params(job.params)
        assert hosted.vm is not None and hosted.runner is not None
        stream_file = job.params.get("stream_file")
        tee = daemon.images.create(stream_file) if stream_file else None
        incoming = ask_destination(
            job.peer,
            {
                "vm": hosted.name,
                "definition": hosted.definition,
                "verify": params.verify,
                "peer": daemon.control_url,
            },
            daemon.token,
            daemon.tls,
        )
        job.progress["peer_job"] = incoming.get("job")
        daemon.save_job(job)
        worker = SourceWorker(daemon, hosted, job, params, fault, incoming, prev_state, tee)
    except BaseException:
        if tee is not None:
            tee.discard()
        daemon.forget_job(job)
        daemon.end_source_job(hosted, prev_state)
        raise
    job.thread = threading.Thread(target=worker.run, name=f"mig-src-{job.id}", daemon=True)
    job.thread.start()
    return job


def _damaged(buffers: list[Buffer]) -> list[Buffer]:
    """Fault ``commit:corrupt``: the frame with one payload byte flipped (its CRC no
    longer matches: the destination must refuse it)."""
    body = bytearray(buffers[-1])
    body[len(body) // 2] ^= 0xFF
    return [*buffers[:-1], bytes(body)]


class SourceWorker(SwitchoverAckSide, LinkProbeSide):
    """The source's side of the migration connection (see the module docstring)."""

    def __init__(
        self,
        daemon: MigrationHost,
        hosted: HostedVm,
        job: Job,
        params: MigrationParams,
        fault: Fault | None,
        incoming: dict[str, Any],
        prev_state: str,
        tee: Output | None = None,
        dialer: Dialer | None = None,
    ) -> None:
        self.daemon, self.hosted, self.job = daemon, hosted, job
        self.params, self.fault, self.incoming = params, fault, incoming
        self.prev_state = prev_state
        self.committed = False
        self.verification: dict[str, Any] = {"requested": params.verify}
        assert hosted.vm is not None and hosted.runner is not None
        self.runner: VmRunner = hosted.runner
        self.session = SourceSession(
            hosted.vm, params, MonotonicClock(), guest=self.runner, link=self
        )
        self.session.meter.guest_cpu = self.runner.cpu_seconds
        self._dialer: Dialer = dialer or (lambda addr, t: dial(addr, t, daemon.tls))
        #: the channel to the destination, once connected
        self.ch: Channel | None = None
        #: the destination's failure, as it reported it (typed: kind, step, message)
        self.peer_status: Why | None = None
        self._peer_words: tuple[str, str | None] = ("", None)
        #: RAM over parallel data channels, once open
        self.channels: datachannels.ChannelSink | None = None
        #: the channel protocol minor version the destination speaks (its WELCOME's)
        self.peer_minor = 0
        #: one persist of the job, measured (a moving average)
        self._persist_s = 0.0
        #: the switchover's fixed costs, sampled at quiet moments (medians count)
        self.fixed = FixedCosts()
        self._recall_switchover()
        self._last_stats = 0.0
        self._bound = ACTIVE_STALL_S
        #: the stream copy (``stream_file``), renamed into place if the migration completes
        self.tee = tee

    def run(self) -> None:
        try:
            self._check_cancel()
            self._preflight()
            self._measure_round_trip()
            self._quiet_samples()
            self.ch = self._connect()
            self._open_channels()
            self._device_over_channels()
            self._recall_device_rate()  # per path: the channels are open, or not
            self._send_stream(self.ch)
            self._await_ack(self.ch)
        except Exception as exc:  # the source VM must survive anything
            self._failed(exc)
        finally:
            if self.channels is not None:
                self.channels.close()
            if self.ch is not None:
                self.ch.link.close()
            if self.tee is not None:
                self._finish_tee()

    def _failed(self, exc: Exception) -> None:
        """Turn whatever ended the exchange into the job's failure, with the step named."""
        if self.peer_status is not None:  # the destination's own error, as it raised it
            reason, step = self._peer_words
            self._fail(reason, step)
        elif isinstance(exc, MigrationRefused):
            self._fail(exc.reason, "pre-flight")
            self._abort_incoming(exc)
        elif isinstance(exc, CutConnection):
            if self.ch is not None:
                self.ch.link.close()  # the injected cut: nothing more goes out
            self._fail(str(exc), say=False)
        elif isinstance(exc, RemoteChannelError):
            self._fail(f"destination broke the channel: {exc.reason} (channel state "
                       f"{exc.step or 'unknown'})")  # fmt: skip
        elif isinstance(exc, PeerError) and (words := self._peer_reason()) is not None:
            # a data channel closed under a wait (its OWED report): the destination
            # failed and said why on the main connection -- that is the cause
            self._fail(words, exc.step or None)
        elif isinstance(exc, MigrationError):
            self._fail(exc.reason, exc.step or None, cancelled=self.job.cancel.is_set())
        elif isinstance(exc, ssl.SSLError):
            self._fail(explain(exc, "the destination", server=False))
        elif isinstance(exc, StreamError):  # e.g. a data channel's OWED report refused
            self._fail(describe_failure(exc))
        elif isinstance(exc, OSError):
            reason = self._peer_reason() or f"connection lost: {exc.strerror or exc}"
            self._fail(reason)
        else:
            log.exception("source job %s", self.job.id)
            self._fail(describe_failure(exc))

    def _finish_tee(self) -> None:
        assert self.tee is not None
        if self.job.status is not JobStatus.COMPLETED:
            self.tee.discard()
            return
        try:
            self.tee.commit()
        except OSError as exc:
            self.tee.discard()
            log.warning("job %s: stream copy not kept: %s", self.job.id, exc.strerror)

    # --- the destination's word ---------------------------------------------------------

    def _remote(self, ev: Event | Closed, what: str) -> VmferryError:
        """The destination's REJECT or ERROR as the error it raised (its class, step and
        message), remembered with the words the job reports; ``what`` says when it came
        ("handshake", "stream", "load")."""
        if not isinstance(ev, Error | Reject):
            return PeerError(f"destination sent {type(ev).__name__.upper()} during the {what}",
                             self.session.current_step())  # fmt: skip
        st = self.peer_status = ev.status
        text = remote_text(st)
        if what == "handshake":
            self._peer_words = (f"destination refused the migration at {st.step}: {text}",
                                "handshake")  # fmt: skip
        elif what == "stream":
            self._peer_words = (f"destination refused the stream at {st.step}: {text}", None)
        else:
            self._peer_words = (f"destination failed at {st.step}: {text}",
                                st.step or "destination load")  # fmt: skip
        return st.exception()

    def _peer_reason(self) -> str | None:
        """After a send failed: if the destination explained itself before closing, its
        words (and its typed status)."""
        if self.ch is None:
            return None
        status = self.ch.peer_failure()
        if status is None:
            return None
        self.peer_status = status
        return f"destination refused the stream at {status.step}: {remote_text(status)}"

    # --- bounded waits -----------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self.job.cancel.is_set() and not self.committed:
            raise MigrationError("cancelled by the operator", self.session.current_step())

    def _on_stall(self, seconds: float) -> None:
        """Called while a send or receive makes no progress: cancel, or give up."""
        self._check_cancel()
        if seconds > self._bound:
            paused = "with the guest paused " if self.session.guest_paused else ""
            raise PeerError(
                f"the destination made no progress for {seconds:.1f} s {paused}"
                f"(bound {self._bound:.1f} s)", self.session.current_step())

    def _set_bound(self, *, loading: bool = False) -> None:
        if self.session.guest_paused:
            self._bound = stall_bound_s(self.params, self.session.vm.ram.size, loading=loading)
        else:
            self._bound = ACTIVE_STALL_S

    def _persist(self, status: JobStatus | str, step: str = "") -> None:
        """Job state at every step, so a restarted daemon knows how far it got.

        With the guest paused, a step of the transfer is published but not written: each
        write is a synchronous commit (milliseconds of downtime), and a daemon that
        restarts before COMMIT treats the job alike whichever transfer step it recorded.
        What recovery depends on is still written before it is acted on: COMMIT (with
        ``commit_sent``) and every final status."""
        if (status, step) != (self.job.status, self.job.step):
            self.job.move(status, step)
            if self._unrecorded_step():
                self.daemon.publish_job(self.job)
                return
            t0 = time.monotonic()
            self.daemon.save_job(self.job)
            took = time.monotonic() - t0
            self._persist_s = took if not self._persist_s else 0.7 * self._persist_s + 0.3 * took

    def _unrecorded_step(self) -> bool:
        return (self.session.guest_paused and not self.committed
                and self.job.status in (JobStatus.ACTIVE, JobStatus.DEVICE))

    # --- the exchange ------------------------------------------------------------------

    def _preflight(self) -> None:
        with self.runner.lock:  # handlers inspect device state the guest's thread changes
            warnings = self.session.preflight(self.incoming.get("capabilities"))
        for w in warnings:
            log.warning("job %s pre-flight: %s", self.job.id, w)

    def _unlogged_write(self) -> None:
        """Fault ``active:unlogged-write``: change page 0 without a dirty mark, once."""
        assert self.hosted.vm is not None
        with self.runner.lock:
            ram = self.hosted.vm.ram
            ram.device_write(0, bytes(b ^ 0xFF for b in ram.read(0, 64)))
        self.fault = None

    def _address(self) -> tuple[str, int]:
        host, port = self.incoming["migration_address"]
        return str(host), int(port)

    def _abort_incoming(self, exc: MigrationRefused) -> None:
        """Tell the destination to forget the token it handed out: ABORT, with the
        token, as the first frame of a connection."""
        status = Why(ErrorKind.REFUSED, "pre-flight",
                     f"source refused at pre-flight: {exc.reason}")  # fmt: skip
        try:
            link = self._dialer(self._address(), 5.0)
        except (OSError, VmferryError):
            return
        try:
            Channel(link, Connection(Role.SOURCE)).send(Abort(status, self.incoming["token"]))
        except (OSError, VmferryError):
            pass
        finally:
            link.close()

    def _connect(self) -> Channel:
        link = self._dialer(self._address(), HELLO_TIMEOUT_S)
        ch = self.ch = Channel(link, Connection(Role.SOURCE))
        self._bound = HELLO_TIMEOUT_S
        ch.send(Hello(self.incoming["token"], (MAJOR, MINOR), self.prev_state,
                      self.daemon.name), self._on_stall)  # fmt: skip
        reply = ch.next_event(self._on_stall)
        if not isinstance(reply, Welcome):
            raise self._remote(reply, "handshake")
        self.peer_minor = reply.minor
        self._negotiate_switchover_ack(reply)
        return ch

    def _parallel(self) -> int:
        """Data channels wanted: the parameter, or the host's default; none when the
        stream is also written to a file (the file must hold every page)."""
        wanted = self.job.params.get("parallel")
        if self.tee is not None:
            return 0
        return datachannels.DEFAULT_PARALLEL if wanted is None else int(wanted)

    def _open_channels(self) -> None:
        """RAM over parallel data channels, when wanted and the destination offers them
        (its job names the port: ``progress.data_port``)."""
        count = self._parallel()
        if count <= 0:
            return
        try:
            client = HostClient(self.job.peer, self.daemon.token, timeout=10.0,
                                tls=client_context(self.daemon.tls))
            peer = client.get(f"/v1/jobs/{self.job.progress.get('peer_job')}")
        except (ApiError, HostError) as exc:  # RAM goes in the main stream then
            log.warning("job %s: no data channels (cannot ask the destination for them: "
                        "%s)", self.job.id, exc)
            return
        port = peer.get("progress", {}).get("data_port") if isinstance(peer, dict) else None
        if not isinstance(port, int):
            return  # a destination without data channels: RAM in the main stream
        tls = client_context(self.daemon.tls)
        socks = datachannels.dial_channels((self._address()[0], port),
                                           self.incoming["token"], count, tls)
        self.channels = datachannels.ChannelSink(socks, self.session,
                                                 on_stall=self._channel_stall,
                                                 check=self._check_cancel,
                                                 progress=self._channel_progress,
                                                 fault=self.fault,
                                                 live=self._live_pages())
        self.session.ram_sink = self.channels
        self.job.progress["parallel"] = count

    def _live_pages(self) -> bool:
        """Whether the destination takes LIVE records and sends OWED reports (channel
        protocol 1.3): pass 1's runs go without the snapshot copy then."""
        return self.peer_minor >= LIVE_PAGES_MINOR

    def _channel_progress(self) -> None:
        """While the channels send a pass: the operator's changes, the job's figures."""
        self._retune()
        self._persist(self.session.status.value, self.session.current_step())
        self._publish()

    def _channel_stall(self, seconds: float) -> None:
        self._set_bound()
        self._on_stall(seconds)

    def _phase(self) -> str:
        st = self.session.status
        return {Status.SETUP: "setup", Status.ACTIVE: "active", Status.DEVICE: "device"}.get(
            st, "ack"
        )

    def _send_stream(self, ch: Channel) -> None:
        bufs = self.session.start()
        first = True
        while bufs:
            self._check_cancel()
            self._retune()
            phase = "setup" if first else self._phase()
            first = False
            self._persist(self.session.status.value, self.session.current_step())
            pace(self.session.pacing_delay, self._between_waits)
            # Before STREAM_END the destination speaks only to report an error (ERROR).
            early = ch.poll_event()
            if early is not None and not self._took_switchover_ack(early):
                raise self._remote(early, "stream")
            self._remember_bandwidth()
            # with data channels, RAM (and a fault that damages it) travels there
            corrupt_ram = self.fault is not None and self.fault.action == "corrupt"
            wire = bufs if self.channels is not None and phase == "active" and corrupt_ram \
                else apply(self.fault, phase, bufs)  # fmt: skip
            self._set_bound()
            ch.send_stream(wire, self._on_stall)
            if self.tee is not None:
                self.tee.file.writelines(wire)
            if phase == "active" and self.fault is not None and self.fault.action == (
                "unlogged-write"
            ):
                self._unlogged_write()
            self._publish()
            bufs = self._next_buffers(ch)
        ch.send(StreamEnd(), self._on_stall)
        self._persist(self.session.status.value, self.session.current_step())

    def _between_waits(self) -> None:
        """While the cap holds the stream back: a cancel or a changed cap acts at once."""
        self._check_cancel()
        self._retune()

    def _retune(self) -> None:
        """Apply parameter changes the operator made since the last batch."""
        with self.daemon.lock:
            changes, self.job.retune = self.job.retune, {}
        if changes:
            self.session.retune(changes)
            self.params = self.session.params

    def _await_ack(self, ch: Channel) -> None:
        if self.params.verify:  # taken now, while the destination loads
            self.session.switchover_digests()
        if self.fault is not None and self.fault.phase == "ack":
            apply(self.fault, "ack", [])
        self._set_bound(loading=True)
        reply = ch.next_event(self._on_stall)
        if not isinstance(reply, Loaded):
            raise self._remote(reply, "load")
        self.session.loaded()
        ack = dict(reply.ack)
        # Verification guards the point of no return: the destination's digests came
        # with LOADED and are compared here, before COMMIT.  On a mismatch the source
        # sends ABORT (the destination discards its VM) and fails: its guest resumes.
        self.verification = self.session.verification(ack)
        if self.verification["requested"] and not self.verification["commit_allowed"]:
            reason = (f"verification failed before commit: destination state differs in "
                      f"{self.verification['blocking'] or 'its digests (none sent)'}")
            raise MigrationError(reason, "verification")
        self._check_cancel()  # the last moment a cancel takes effect
        # COMMIT is persisted before it is sent: a daemon that restarts from here on
        # must ask the destination instead of booting the VM again.
        self.committed = True
        self.job.progress["commit_sent"] = True
        self._persist(JobStatus.DEVICE, "commit")
        self._set_bound()
        try:
            self._send_commit(ch)
            resumed = ch.next_event(self._on_stall)
        except (PeerError, OSError, CutConnection) as exc:
            if isinstance(exc, CutConnection):
                ch.link.close()
            self._settle_after_commit(f"no resume confirmation after commit ({exc})", ack)
            return
        if not isinstance(resumed, Resumed):
            what = (f"at {resumed.status.step}: {remote_text(resumed.status)}"
                    if isinstance(resumed, Error) else type(resumed).__name__)  # fmt: skip
            if isinstance(resumed, Error):
                self.peer_status = resumed.status
            self._settle_after_commit(f"destination failed after commit {what}", ack)
            return
        post_load = resumed.report.get("post_load", {})
        self._completed(ack, dict(post_load) if isinstance(post_load, dict) else {}, "",
                        resumed.report.get("resume_ms", 0.0))

    def _send_commit(self, ch: Channel) -> None:
        if self.fault is not None and self.fault.phase == "commit":
            if self.fault.action == "corrupt":  # a COMMIT damaged in flight
                ch.send(Commit(), self._on_stall, damage=_damaged)
                return
            ch.send(Commit(), self._on_stall)
            raise CutConnection(f"injected fault {self.fault}")  # RESUMED never arrives
        ch.send(Commit(), self._on_stall)

    def _completed(self, ack: dict[str, Any], post_load: dict[str, Any], note: str,
                   resume_ms: object = 0.0) -> None:  # fmt: skip
        with contextlib.suppress(TypeError, ValueError):  # the destination's adopt, measured
            ack["adopt_ms"] = float(resume_ms)  # type: ignore[arg-type]
        stats = self.session.complete(ack)
        self._remember_device_rate()
        self._remember_switchover(stats)
        self.job.stats = {**stats.to_json(), "verification": self.verification,
                          "source_report": self.hosted.vm.report() if self.hosted.vm else {},
                          "destination_report": post_load,
                          "destination_ok": destination_ok(post_load)}
        overrun = downtime_overrun(self.job.stats, self.params.downtime_limit_ms)
        if overrun:
            self.job.stats["warnings"] = [*self.job.stats.get("warnings", []), overrun]
            log.warning("job %s: %s", self.job.id, overrun)
        if not self.job.stats["destination_ok"]:
            log.warning("job %s: post-load work failed on the destination: %s", self.job.id,
                        sorted(k for k, r in post_load.items() if not r.get("ok", True)))
        self.daemon.end_source_job(self.hosted, Runstate.MIGRATED, note)
        self.hosted.release()
        # "completed" only once the husk is released: a destroy may follow at once
        self.job.error = note
        self._persist(JobStatus.COMPLETED, "completed")
        log.info("job %s: %s migrated, downtime %.1f ms", self.job.id, self.hosted.name,
                 stats.downtime.total_ms)
        if self.job.params.get("undefine_source"):
            self.daemon.undefine(self.hosted.name)

    def _settle_after_commit(self, reason: str, ack: dict[str, Any]) -> None:
        """COMMIT went out but RESUMED did not come back.  The channel's rules say what
        that means (``Rules.source_verdict``): an ERROR from the destination is a definite
        "never resumed" (so is a COMMIT whose write failed: it never left); a broken
        connection leaves the source in doubt, and it asks the destination's control
        API.  Resumed there: the migration completed.  Never resumed: the source
        resumes.  Cannot tell: the guest stays paused here, the VM ``needs-attention``."""
        conn = self.ch.conn if self.ch is not None else None
        if conn is not None and conn.state not in TERMINAL:
            conn.send_failure(Why(ErrorKind.PEER, "commit", reason))  # -> ERROR
        verdict = Rules().source_verdict(conn) if conn is not None else Verdict.IN_DOUBT
        if verdict is Verdict.RESUME:
            outcome = "not-resumed"
        elif verdict is Verdict.MIGRATED:
            outcome = "resumed"
        else:
            outcome = ask_destination_outcome(
                self.job.peer, self.job.progress.get("peer_job"), self.hosted.name,
                self.daemon.token, tls=self.daemon.tls,
            )
        if outcome == "resumed":
            self._completed(ack, {}, f"{reason}; the destination confirmed it runs the VM")
        elif outcome == "not-resumed":
            self.committed = False  # the destination never ran it: undo as before COMMIT
            self._fail(f"{reason}; the destination never resumed the VM, so the source "
                       "resumed it", "commit")
        else:
            self._needs_attention(reason, outcome)

    def _needs_attention(self, reason: str, why: str) -> None:
        peer, name = self.job.peer, self.hosted.name
        note = (f"COMMIT of job {self.job.id} was sent but the outcome is unknown ({why}); "
                f"the guest is paused here. Check `vmferry vm show {name} --host {peer}`: "
                f"if it runs there, `vmferry vm destroy {name}` here; if not, `vmferry vm "
                f"start {name}` here resumes it")
        self.job.error = f"{reason}; {note}"
        self.job.stats = {**self.session.stats.to_json(), "status": "failed",
                          "verification": self.verification}
        self.daemon.end_source_job(self.hosted, Runstate.NEEDS_ATTENTION, note)
        self._persist(JobStatus.FAILED, "commit")
        log.error("job %s: %s", self.job.id, self.job.error)

    def _publish(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= STATS_EVERY_S:
            self._last_stats = now
            self.job.stats = self.session.stats.to_json()
            self.daemon.publish_job(self.job)

    def _fail(self, reason: str, step: str | None = None, cancelled: bool = False,
              say: bool = True) -> None:  # fmt: skip
        """Fail the job before COMMIT: tell the destination (ABORT, unless ``say`` is
        False: an injected cut), give the guest back.  Past COMMIT: settle instead."""
        step = step or self.session.current_step()
        if self.session.status is Status.COMPLETED:
            return
        if self.committed:  # past the point of no return: never run the guest twice
            self._settle_after_commit(reason, {})
            return
        if self.ch is not None and say:  # the destination discards what it has
            kind = ErrorKind.CANCELLED if cancelled else ErrorKind.MIGRATION
            self.ch.send_failure(Why(kind, step, reason))
        stats = self.session.fail(step, reason, cancelled=cancelled)
        self.job.stats = {**stats.to_json(), "verification": self.verification}
        if self.peer_status is not None:
            self.job.stats["destination_error"] = status_json(self.peer_status)
        self.job.error = reason
        self.daemon.end_source_job(self.hosted, self.prev_state)
        self._persist(stats.status.value, step)
        log.warning("job %s %s at %s: %s", self.job.id, self.job.status, step, reason)
