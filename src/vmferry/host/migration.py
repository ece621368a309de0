"""Migration workers: the source's sending thread and the destination's receiving one.

Both keep the sans-IO sessions in charge of *what* happens; this module only moves bytes
and turns every way a connection can fail into a session failure with the step named.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import socket
import ssl
import sys
import termios
import threading
import time
from typing import TYPE_CHECKING, Any

from vmferry.errors import (
    ApiError,
    ConfigError,
    HostError,
    MigrationError,
    MigrationRefused,
    PeerError,
    StreamDecodeError,
    VmferryError,
)
from vmferry.host import datachannels
from vmferry.host.client import HostClient
from vmferry.host.clocks import MonotonicClock
from vmferry.host.faults import CutConnection, Fault, apply
from vmferry.host.files import Output
from vmferry.host.models import MigrationParamsModel, validate
from vmferry.host.outcome import downtime_overrun
from vmferry.host.populate import Populator
from vmferry.host.runner import VmRunner
from vmferry.host.tls import TlsConfig, explain
from vmferry.host.transport import (
    readable,
    recv_frame,
    recv_into_decoder,
    send_buffers,
    send_frame,
    serve_handshakes,
)
from vmferry.machine.vm import load_definition
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession, describe_failure
from vmferry.migration.multichannel import MAX_CHANNELS
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import MAJOR, MINOR, StreamDecoder

if TYPE_CHECKING:  # avoids an import cycle at run time
    from vmferry.host.daemon import HostDaemon, HostedVm, Job

log = logging.getLogger("vmferry.host.migration")

HELLO_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0
STATS_EVERY_S = 0.1
#: the destination's socket receive buffer: a bounded backlog at the switchover (less to
#: drain while the guest is paused, and a known amount for the downtime prediction)
RECEIVE_BUFFER = 2 * 1024 * 1024
#: the best bandwidth a pass measured to each destination (its control URL), kept for
#: migrations whose passes are too small to measure it themselves
_LINK_BANDWIDTH: dict[str, float] = {}
#: the destination's load and resume (s) as the last migration to it (its control URL)
#: reported them, for the downtime prediction
_DESTINATION_FIXED: dict[str, float] = {}
#: job persists with the guest paused: the source's DEVICE, awaiting-resume and commit
#: steps, the destination's resume and completed
PAUSED_PERSISTS = 5
#: the source's bound on a destination that makes no progress while the guest runs
ACTIVE_STALL_S = 30.0
#: ... and while the guest is paused: STALL_BASE_S + STALL_PER_LIMIT x the downtime limit
#: (+ VERIFY_S_PER_GIB a GiB of RAM while the destination digests it); see stall_bound_s
STALL_BASE_S = 2.0
STALL_PER_LIMIT = 4.0
VERIFY_S_PER_GIB = 1.0
#: how long the source asks a destination that went silent after COMMIT what happened
SETTLE_S = 5.0


HOST_PARAMS = ("fault", "stream_file", "undefine_source", "parallel")


def destination_ok(post_load: dict[str, Any]) -> bool:
    """Whether every handler's post-load work succeeded on the destination.  It runs after
    COMMIT: a failure there cannot give the VM back to the source, so the migration
    completes and this flag (with each handler's report) says what went wrong."""
    return all(r.get("ok", True) for r in post_load.values() if isinstance(r, dict))


def parse_params(raw: object) -> tuple[MigrationParams, Fault | None]:
    """Migration parameters from a request, every one checked (types, ranges, the
    convergence policy they make); ApiError 400 before anything else happens."""
    model = validate(MigrationParamsModel, raw, "migration parameters")
    try:
        fault = Fault.parse(model.fault) if model.fault else None
        params = MigrationParams(**model.model_dump(exclude=set(HOST_PARAMS)))
        params.policy()
    except (TypeError, ValueError, ConfigError) as exc:
        raise ApiError(400, f"bad migration parameters: {exc}", "InvalidRequest") from exc
    return params, fault


# --- source ------------------------------------------------------------------------------


def _check_peer_tls(tls: TlsConfig | None, url: str) -> None:
    """A TLS host talks only to TLS peers; a plaintext host cannot talk to a TLS one."""
    if tls is not None and not url.startswith("https://"):
        raise ApiError(502, f"this host serves TLS and refuses the plaintext destination "
                            f"{url} (give its https:// URL; it must serve with --tls-dir)",
                       "PeerNotTls", "setup")  # fmt: skip
    if tls is None and url.startswith("https://"):
        raise ApiError(502, f"destination {url} serves TLS and this host has no certificate "
                            "of its cluster (serve this host with --tls-dir)", "PeerTls",
                       "setup")  # fmt: skip


def _ask_destination(url: str, body: dict[str, Any], token: str | None,
                     tls: TlsConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """POST /v1/incoming on the destination (with the cluster's token): its one-time token
    and capabilities.  ApiError 502 if it cannot be reached or answers nonsense; its own
    refusal (a name it holds: 409) keeps the destination's status."""
    try:
        _check_peer_tls(tls, url)
        ctx = tls.client_context() if tls is not None else None
        reply = HostClient(url, token, timeout=30.0, tls=ctx).post("/v1/incoming", body)
    except ApiError as exc:
        if exc.status == 401:
            raise ApiError(502, f"destination {url} refused this host's token: the hosts "
                                "do not share a --token-file", "PeerUnauthorized",
                           "setup") from exc
        raise ApiError(exc.status, f"destination {url}: {exc.message}", exc.kind,
                       exc.step or "setup") from exc
    except HostError as exc:
        raise ApiError(502, f"destination control API unreachable: {exc}", "PeerUnreachable",
                       "setup") from exc
    if not isinstance(reply, dict) or not isinstance(reply.get("token"), str):
        raise ApiError(502, "destination answered /v1/incoming without a token",
                       "PeerError", "setup")
    return reply


def stall_bound_s(params: MigrationParams, ram_bytes: int, *, loading: bool = False) -> float:
    """How long the source, with the guest paused, waits for a destination that makes no
    progress before it gives up: ``STALL_BASE_S`` plus ``STALL_PER_LIMIT`` times the
    downtime limit, and while it waits for LOADED with verification on, the time the
    destination needs to digest the guest's RAM (``VERIFY_S_PER_GIB`` a GiB).  With the
    default 300 ms limit: 3.2 s (4.2 s for LOADED of a verified 1 GiB guest)."""
    bound = STALL_BASE_S + STALL_PER_LIMIT * params.downtime_limit_ms / 1e3
    if loading and params.verify:
        bound += VERIFY_S_PER_GIB * ram_bytes / 2**30
    return bound


def ask_destination_outcome(
    peer: str, peer_job: object, vm_name: str, token: str | None = None,
    wait_s: float = SETTLE_S, tls: TlsConfig | None = None,
) -> str:
    """After COMMIT went out and RESUMED did not come back: ask the destination's control
    API (its job is persisted at every step) whether it resumed the VM.  ``"resumed"``
    (its job completed and it holds the VM with its memory), ``"not-resumed"`` (its job
    failed or was cancelled: it never ran the VM, or stopped it again), or a description
    of why it cannot tell -- after retrying for ``wait_s`` seconds."""
    if not isinstance(peer_job, str):
        return "no destination job is on record"
    client = HostClient(peer, token, timeout=2.0,
                        tls=tls.client_context() if tls is not None else None)
    end = time.monotonic() + wait_s
    why = "no answer"
    while True:
        try:
            job = client.get(f"/v1/jobs/{peer_job}")
            status = job.get("status") if isinstance(job, dict) else None
            if status in ("failed", "cancelled"):
                return "not-resumed"
            if status == "completed":
                vm = client.get(f"/v1/vms/{vm_name}")
                if isinstance(vm, dict) and vm.get("memory_lost"):
                    return f"{peer} restarted since and lost the VM's memory"
                return "resumed"
            why = f"its job {peer_job} is still {status}"
        except VmferryError as exc:
            why = f"its control API does not answer: {exc}"
        if time.monotonic() >= end:
            return why
        time.sleep(0.2)


def start_source_job(
    daemon: HostDaemon, hosted: HostedVm, job: Job, prev_state: str
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
        incoming = _ask_destination(
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


class SourceWorker:
    """The source's side of the migration connection.

    The exchange (kept in one place so it can move onto a sans-IO protocol object)::

        HELLO -> WELCOME; stream ... END;
        <- LOADED {ack, digests}   compare digests (verify); differ: ABORT, fail, resume
        persist commit_sent; COMMIT ->
        <- RESUMED                 completed: the husk is released
        anything else after COMMIT: settle (see _settle_after_commit)

    Every wait is bounded (:func:`stall_bound_s` while the guest is paused,
    ``ACTIVE_STALL_S`` while it runs) and looks at the job's cancel flag, which takes
    effect in every phase before COMMIT; the daemon refuses a cancel after it.
    """

    def __init__(
        self,
        daemon: HostDaemon,
        hosted: HostedVm,
        job: Job,
        params: MigrationParams,
        fault: Fault | None,
        incoming: dict[str, Any],
        prev_state: str,
        tee: Output | None = None,
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
        self._sock: socket.socket | None = None
        self.channels: datachannels.ChannelSink | None = None
        self._welcome: dict[str, Any] = {}
        #: one persist of the job, measured (a decaying maximum)
        self._persist_s = 0.0
        self._rtt_s = 0.0
        self._last_stats = 0.0
        self._bound = ACTIVE_STALL_S
        #: the stream copy (``stream_file``), renamed into place if the migration completes
        self.tee = tee

    def run(self) -> None:
        sock: socket.socket | None = None
        try:
            self._check_cancel()
            self._preflight()
            self._rtt_s = self._measure_round_trip()
            sock = self._sock = self._connect()
            self._open_channels()
            self._send_stream(sock)
            self._await_ack(sock)
        except MigrationRefused as exc:
            self._fail(exc.reason, "pre-flight")
            self._abort_incoming(f"source refused at pre-flight: {exc}")
        except CutConnection as exc:
            self._fail(str(exc))
        except MigrationError as exc:
            self._fail(exc.reason, exc.step or None, cancelled=self.job.cancel.is_set())
        except ssl.SSLError as exc:
            self._fail(explain(exc, "the destination", server=False))
        except OSError as exc:
            reason = self._peer_reason(sock) or f"connection lost: {exc.strerror or exc}"
            self._fail(reason)
        except Exception as exc:  # the source VM must survive anything
            log.exception("source job %s", self.job.id)
            self._fail(describe_failure(exc))
        finally:
            if self.channels is not None:
                self.channels.close()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            if self.tee is not None:
                self._finish_tee()

    def _finish_tee(self) -> None:
        assert self.tee is not None
        if self.job.status != "completed":
            self.tee.discard()
            return
        try:
            self.tee.commit()
        except OSError as exc:
            self.tee.discard()
            log.warning("job %s: stream copy not kept: %s", self.job.id, exc.strerror)

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

    def _persist(self, status: str, step: str = "") -> None:
        """Job state at every step, so a restarted daemon knows how far it got."""
        if (status, step) != (self.job.status, self.job.step):
            self.job.status, self.job.step = status, step
            t0 = time.monotonic()
            self.daemon.save_job(self.job)
            self._persist_s = max(self._persist_s * 0.5, time.monotonic() - t0)

    # --- the exchange ------------------------------------------------------------------

    def _preflight(self) -> None:
        with self.runner.lock:  # handlers inspect device state the guest's thread changes
            warnings = self.session.preflight(self.incoming.get("capabilities"))
        for w in warnings:
            log.warning("job %s pre-flight: %s", self.job.id, w)

    def _measure_round_trip(self) -> float:
        """Median of three control-API round trips to the destination host."""
        client = HostClient(self.job.peer, self.daemon.token, timeout=5.0)
        samples = []
        for _ in range(3):
            t0 = time.monotonic()
            try:
                client.get("/v1/host")
            except (ApiError, HostError):
                return 0.0
            samples.append(time.monotonic() - t0)
        return sorted(samples)[1]

    def round_trip_s(self) -> float:
        return self._rtt_s

    def bandwidth_bps(self) -> float:
        return _LINK_BANDWIDTH.get(self.job.peer, 0.0)

    def fixed_switchover_s(self) -> float:
        return PAUSED_PERSISTS * self._persist_s + _DESTINATION_FIXED.get(self.job.peer, 0.0)

    def _remember_bandwidth(self) -> None:
        measured = self.session.stats.link_bandwidth_bps
        if measured > _LINK_BANDWIDTH.get(self.job.peer, 0.0):
            _LINK_BANDWIDTH[self.job.peer] = measured

    def in_flight_bytes(self) -> int:
        """Unsent and unacknowledged bytes in our send queue (SIOCOUTQ) plus, when that
        queue is not empty (the destination is behind), its full receive buffer."""
        queued = 0
        if self._sock is not None:
            with contextlib.suppress(OSError):
                raw = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                queued = int.from_bytes(raw, sys.byteorder, signed=True)
        queued = queued + RECEIVE_BUFFER if queued > 0 else 0
        if self.channels is not None:
            queued += self.channels.in_flight_bytes()
        return queued

    def _unlogged_write(self) -> None:
        """Fault ``active:unlogged-write``: change page 0 without a dirty mark, once."""
        assert self.hosted.vm is not None
        with self.runner.lock:
            ram = self.hosted.vm.ram
            ram.device_write(0, bytes(b ^ 0xFF for b in ram.read(0, 64)))
        self.fault = None

    def _abort_incoming(self, reason: str) -> None:
        """Tell the destination to forget the token it handed out."""
        host, port = self.incoming["migration_address"]
        with contextlib.suppress(OSError), self._dial(host, port, 5) as sock:
            send_frame(sock, "hello", token=self.incoming["token"], abort=reason)

    def _dial(self, host: str, port: int, timeout: float) -> socket.socket:
        """A connection to the destination's listener (TLS when this host serves it)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        if self.daemon.tls is None:
            return sock
        try:
            return self.daemon.tls.client_context().wrap_socket(sock)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise PeerError(explain(exc, f"destination {host}:{port}", server=False),
                            "handshake") from exc

    def _connect(self) -> socket.socket:
        host, port = self.incoming["migration_address"]
        sock = self._dial(host, port, HELLO_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._bound = HELLO_TIMEOUT_S
        send_frame(
            sock,
            "hello",
            on_stall=self._on_stall,
            token=self.incoming["token"],
            stream_version=[MAJOR, MINOR],
            runstate=self.prev_state,
            source=self.daemon.name,
            parallel=self._parallel(),
        )
        reply = recv_frame(sock, self._on_stall)
        if reply["type"] != "welcome":
            raise PeerError(f"destination refused: {reply.get('reason', reply)}", "handshake")
        self._welcome = reply
        return sock

    def _parallel(self) -> int:
        """Data channels asked for: the parameter, or the host's default; none when the
        stream is also written to a file (the file must hold every page)."""
        wanted = self.job.params.get("parallel")
        if self.tee is not None:
            return 0
        return datachannels.DEFAULT_PARALLEL if wanted is None else int(wanted)

    def _open_channels(self) -> None:
        """RAM over parallel data channels when the destination agreed to them."""
        count = self._welcome.get("parallel", 0)
        if not isinstance(count, int) or count <= 0 or count != self._parallel():
            return
        host, port = self.incoming["migration_address"]
        self._bound = HELLO_TIMEOUT_S
        socks = datachannels.dial_channels(lambda: self._dial(host, port, HELLO_TIMEOUT_S),
                                           self.incoming["token"], count, self._on_stall)
        self.channels = datachannels.ChannelSink(socks, self.session,
                                                 on_stall=self._channel_stall,
                                                 check=self._check_cancel,
                                                 progress=self._channel_progress,
                                                 fault=self.fault)
        self.session.ram_sink = self.channels
        self.job.progress["parallel"] = count

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

    def _send_stream(self, sock: socket.socket) -> None:
        bufs = self.session.start()
        first = True
        while bufs:
            self._check_cancel()
            self._retune()
            phase = "setup" if first else self._phase()
            first = False
            self._persist(self.session.status.value, self.session.current_step())
            delay = self.session.pacing_delay()
            if delay > 0:
                time.sleep(min(delay, 0.5))
            # Before END the destination speaks only to report an error; after END it
            # answers LOADED, so the check must come before a send, never after one.
            if readable(sock):
                reason = self._peer_reason(sock) or "destination closed the connection"
                raise PeerError(reason, self.session.current_step())
            self._remember_bandwidth()
            # with data channels, RAM (and a fault that damages it) travels there
            corrupt_ram = self.fault is not None and self.fault.action == "corrupt"
            wire = bufs if self.channels is not None and phase == "active" and corrupt_ram \
                else apply(self.fault, phase, bufs)  # fmt: skip
            self._set_bound()
            send_buffers(sock, wire, self._on_stall)
            if self.tee is not None:
                self.tee.file.writelines(wire)
            if phase == "active" and self.fault is not None and self.fault.action == (
                "unlogged-write"
            ):
                self._unlogged_write()
            self._publish()
            bufs = self.session.next_buffers()
        self._persist(self.session.status.value, self.session.current_step())

    def _retune(self) -> None:
        """Apply parameter changes the operator made since the last batch."""
        with self.daemon.lock:
            changes, self.job.retune = self.job.retune, {}
        if changes:
            self.session.retune(changes)
            self.params = self.session.params

    def _await_ack(self, sock: socket.socket) -> None:
        if self.params.verify:  # taken now, while the destination loads
            self.session.switchover_digests()
        if self.fault is not None and self.fault.phase == "ack":
            apply(self.fault, "ack", [])
        self._set_bound(loading=True)
        try:
            reply = recv_frame(sock, self._on_stall)
        except PeerError as exc:
            if exc.step:
                raise
            raise PeerError(str(exc), "awaiting destination load") from exc
        if reply["type"] != "loaded":
            raise PeerError(
                f"destination failed: {reply.get('reason', reply)}",
                str(reply.get("step", "destination load")),
            )
        ack = reply.get("ack", {})
        # Verification guards the point of no return: the destination's digests came
        # with LOADED and are compared here, before COMMIT.  On a mismatch the source
        # sends ABORT (the destination discards its VM) and fails: its guest resumes.
        self.verification = self.session.verification(ack)
        if self.verification["requested"] and not self.verification["commit_allowed"]:
            reason = (f"verification failed before commit: destination state differs in "
                      f"{self.verification['blocking'] or 'its digests (none sent)'}")
            with contextlib.suppress(OSError):
                send_frame(sock, "abort", reason=reason)
            raise MigrationError(reason, "verification")
        self._check_cancel()  # the last moment a cancel takes effect
        # COMMIT is persisted before it is sent: a daemon that restarts from here on
        # must ask the destination instead of booting the VM again.
        self.committed = True
        self.job.progress["commit_sent"] = True
        self._persist("device", "commit")
        self._set_bound()
        try:
            self._send_commit(sock)
            resumed = recv_frame(sock, self._on_stall)
        except (PeerError, OSError) as exc:
            self._settle_after_commit(f"no resume confirmation after commit ({exc})", None, ack)
            return
        if resumed["type"] != "resumed":
            self._settle_after_commit(f"destination failed after commit: "
                                      f"{resumed.get('reason', resumed)}", resumed, ack)
            return
        self._completed(ack, resumed.get("post_load", {}), "",
                        resumed.get("resume_ms", 0.0))

    def _send_commit(self, sock: socket.socket) -> None:
        if self.fault is not None and self.fault.phase == "commit":
            if self.fault.action == "corrupt":  # a COMMIT damaged in flight
                body = b'{"type": "comm\xffit"}'
                sock.sendall(len(body).to_bytes(4, "big") + body)
                return
            send_frame(sock, "commit", on_stall=self._on_stall)
            raise CutConnection(f"injected fault {self.fault}")  # RESUMED never arrives
        send_frame(sock, "commit", on_stall=self._on_stall)

    def _completed(self, ack: dict[str, Any], post_load: dict[str, Any], note: str,
                   resume_ms: float = 0.0) -> None:  # fmt: skip
        stats = self.session.complete(ack)
        with contextlib.suppress(TypeError, ValueError):
            _DESTINATION_FIXED[self.job.peer] = (float(ack.get("load_ms", 0.0))
                                                 + float(resume_ms)) / 1e3
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
        self.daemon.end_source_job(self.hosted, "migrated", note)
        self.hosted.release()
        # "completed" only once the husk is released: a destroy may follow at once
        self.job.error = note
        self._persist("completed", "completed")
        log.info("job %s: %s migrated, downtime %.1f ms", self.job.id, self.hosted.name,
                 stats.downtime.total_ms)
        if self.job.params.get("undefine_source"):
            self.daemon.undefine(self.hosted.name)

    def _settle_after_commit(
        self, reason: str, frame: dict[str, Any] | None, ack: dict[str, Any]
    ) -> None:
        """COMMIT went out but RESUMED did not come back.  A destination that says it
        failed while awaiting COMMIT never resumed; otherwise its control API is asked.
        Resumed there: the migration completed.  Never resumed: the source resumes.
        Cannot tell: the guest stays paused here, the VM ``needs-attention``."""
        if frame is not None and frame.get("step") == "awaiting commit":
            outcome = "not-resumed"
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
        self.daemon.end_source_job(self.hosted, "needs-attention", note)
        self._persist("failed", "commit")
        log.error("job %s: %s", self.job.id, self.job.error)

    def _peer_reason(self, sock: socket.socket | None) -> str | None:
        """If the destination explained itself before closing, its words."""
        if sock is None:
            return None
        try:
            sock.settimeout(1.0)
            msg = recv_frame(sock)
        except (OSError, VmferryError):
            return None
        if msg.get("type") == "error":
            return f"destination refused the stream at {msg.get('step')}: {msg.get('reason')}"
        return None

    def _publish(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= STATS_EVERY_S:
            self._last_stats = now
            self.job.stats = self.session.stats.to_json()
            self.daemon.publish_job(self.job)

    def _fail(self, reason: str, step: str | None = None, cancelled: bool = False) -> None:
        step = step or self.session.current_step()
        if self.session.status is Status.COMPLETED:
            return
        if self.committed:  # past the point of no return: never run the guest twice
            self._settle_after_commit(reason, None, {})
            return
        stats = self.session.fail(step, reason, cancelled=cancelled)
        self.job.stats = {**stats.to_json(), "verification": self.verification}
        self.job.error = reason
        self.daemon.end_source_job(self.hosted, self.prev_state)
        self._persist(stats.status.value, step)
        log.warning("job %s %s at %s: %s", self.job.id, self.job.status, step, reason)


# --- destination -------------------------------------------------------------------------


def _version_ok(version: object) -> bool:
    """A hello's ``stream_version``: ``[major, minor]`` integers with our major."""
    return (
        isinstance(version, list) and len(version) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in version)
        and version[0] == MAJOR
    )


def serve_incoming(daemon: HostDaemon, listener: socket.socket) -> None:
    """The migration listener: HELLOs are read by the handshake gate (one thread, an
    overall deadline); a connection gets its worker thread only once its HELLO arrived."""

    def on_hello(conn: socket.socket, addr: Any, hello: dict[str, Any]) -> None:
        if hello.get("type") == "channel":  # a data channel of a migration under way
            datachannels.accept(conn, addr, hello, on_refuse)
            return
        worker = DestinationWorker(daemon, conn, addr, hello)
        threading.Thread(target=worker.run, name=f"mig-dst-{addr[1]}", daemon=True).start()

    def on_refuse(conn: socket.socket, addr: Any, reason: str) -> None:
        refuse_connection(daemon, conn, addr, reason)
        with contextlib.suppress(OSError):
            conn.close()

    def tls_error(exc: BaseException, addr: Any) -> str:
        return explain(exc, f"{addr[0]}:{addr[1]}", server=True)

    tls = daemon.tls.server_context() if daemon.tls is not None else None
    serve_handshakes(listener, lambda: daemon.stopping, on_hello, on_refuse, tls=tls,
                     tls_error=tls_error)


def refuse_connection(daemon: HostDaemon, conn: socket.socket, addr: Any, reason: str) -> None:
    """Log a refused migration connection (and record it) and tell the peer why."""
    msg = f"refused migration connection from {addr[0]}:{addr[1]}: {reason}"
    log.warning(msg)
    daemon.store.log("refused", msg)
    with contextlib.suppress(OSError):
        conn.setblocking(True)
        conn.settimeout(1.0)
        send_frame(conn, "reject", reason=reason)


class DestinationWorker:
    def __init__(self, daemon: HostDaemon, conn: socket.socket, addr: Any,
                 hello: dict[str, Any]) -> None:
        self.daemon, self.conn, self.addr = daemon, conn, addr
        self.hello = hello
        self.session: DestinationSession | None = None
        self.job: Job | None = None
        self.step = "handshake"
        self.populator: Populator | None = None
        self.channels: datachannels.ChannelGroup | None = None
        self.staging: Any = None
        self._staging_used = False

    def _tls(self) -> bool:
        """The TLS handshake, when this host serves TLS; False (refused) if it failed.
        (The listener's handshake gate has usually done it already.)"""
        if self.daemon.tls is None or isinstance(self.conn, ssl.SSLSocket):
            return True
        self.conn.settimeout(HELLO_TIMEOUT_S)
        try:
            self.conn = self.daemon.tls.server_context().wrap_socket(self.conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            peer = f"{self.addr[0]}:{self.addr[1]}"
            msg = f"refused migration connection from {peer}: " + explain(exc, peer, server=True)
            log.warning(msg)
            self.daemon.store.log("refused", msg)
            return False
        return True

    def run(self) -> None:
        try:
            if not self._tls():
                return
            hello = self._handshake()
            if hello is not None:
                self._receive(hello)
        except (StreamDecodeError, MigrationError, ConfigError, OSError) as exc:
            self._fail(
                describe_failure(exc)
                if not isinstance(exc, OSError)
                else f"connection lost: {exc.strerror or exc}"
            )
        except Exception as exc:
            log.exception("incoming migration from %s", self.addr)
            self._fail(describe_failure(exc))
        finally:
            self._close_channels()
            if self.populator is not None:
                self.populator.stop()
            if self.staging is not None and not self._staging_used:
                self.staging.close()  # built at the handshake, never used
            with contextlib.suppress(OSError):
                self.conn.close()

    def _close_channels(self) -> None:
        if self.channels is not None:
            self.channels.close()  # its threads stop writing before the RAM may go

    def _handshake(self) -> dict[str, Any] | None:
        self.conn.settimeout(HELLO_TIMEOUT_S)
        hello = self.hello
        inc = self.daemon.claim_token(hello.get("token")) if hello.get("type") == "hello" else None
        if inc is None:
            self._refuse("unknown or expired migration token")
            return None
        self.job = self.daemon.get_job(inc.job_id)
        if hello.get("abort"):
            self.job.status, self.job.step = "failed", "pre-flight"
            self.job.error = str(hello["abort"])
            self.daemon.save_job(self.job)
            return None
        if not _version_ok(hello.get("stream_version")):
            self._refuse(f"stream version {str(hello.get('stream_version'))[:40]} not "
                         f"supported (this host reads {MAJOR}.x)")
            return None
        self.session = DestinationSession(
            MonotonicClock(), verify=inc.verify,
            check_config=self._check_approved(inc.vm, inc.definition),
            factory=self._build_staging,
        )
        # The staging VM (for KVM guests: its VM and memory slot) is built now, before
        # the first byte of data: the stream's configuration must equal this definition.
        self.staging = self.daemon.build_vm({**inc.definition, "fill": "zero"})
        self.populator = Populator(self.staging.ram)
        parallel = hello.get("parallel", 0)
        if isinstance(parallel, int) and not isinstance(parallel, bool) \
                and 1 <= parallel <= MAX_CHANNELS:  # fmt: skip
            self.channels = datachannels.ChannelGroup(str(hello["token"]), parallel,
                                                      self.staging.ram, self._wake)
        else:
            parallel = 0
        with contextlib.suppress(OSError):
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER // 2)
        send_frame(self.conn, "welcome", host=self.daemon.name, parallel=parallel)
        self.conn.settimeout(IDLE_TIMEOUT_S)
        self.job.status, self.job.step = "active", "receiving stream"
        self.daemon.save_job(self.job)
        return hello

    def _build_staging(self, definition: Any) -> Any:
        """The staging VM built at the handshake (its RAM faulted in from a thread while
        the stream arrives); the stream's configuration was checked against it."""
        if self.staging is not None:
            self._staging_used = True
            return self.staging
        vm = self.daemon.build_vm(definition)
        self.populator = Populator(vm.ram)
        return vm

    def _wake(self) -> None:
        """A data channel failed: stop the main connection's wait for the stream."""
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RD)

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
        refuse_connection(self.daemon, self.conn, self.addr, reason)

    def _receive(self, hello: dict[str, Any]) -> None:
        assert self.session is not None and self.job is not None
        decoder = StreamDecoder()
        self.step = "receiving stream"
        while not decoder.done:
            if self.daemon.stopping:
                raise PeerError("destination host is shutting down", self.step)
            if self.job.cancel.is_set():
                raise MigrationError("cancelled by the operator on the destination", self.step)
            try:
                got = recv_into_decoder(self.conn, decoder)
            except TimeoutError:
                # RAM may be moving over the data channels while the main one is quiet
                if self.channels is not None and self.channels.active_within(IDLE_TIMEOUT_S):
                    continue
                raise
            if got == 0:
                if self.channels is not None and self.channels.error:
                    raise PeerError(self.channels.error, self.step)
                decoder.eof()
            for rec in decoder.events():
                self.session.receive(rec)
                self.step = f"receiving stream (pass {self.session.passes + 1})"
        if self.channels is not None:
            self.channels.wait_done(IDLE_TIMEOUT_S, self._check_receiving)
            pages, zero = self.channels.totals()
            self.session.pages_received += pages
            self.session.zero_pages_received += zero
            self._close_channels()
        self.step = "load"
        if self.populator is not None:
            self.populator.stop()
        vm = self.session.vm
        assert vm is not None
        ack = self.session.finish(start=False)
        send_frame(self.conn, "loaded", ack=ack)
        self.step = "awaiting commit"
        commit = recv_frame(self.conn)
        if commit["type"] == "abort":  # the source found our state differs from its own
            raise MigrationError(f"source aborted: {commit.get('reason', '')}", self.step)
        if commit["type"] != "commit":
            raise PeerError(f"expected commit, got {commit['type']}", self.step)
        # After COMMIT.  The job is persisted "completed" once the VM runs here and
        # before RESUMED goes out, so a source that never gets RESUMED can learn the
        # outcome from this host's control API; "failed" always means it does not run here.
        self.step = "resume"
        self.job.step = "resume"
        self.daemon.save_job(self.job)
        t0 = time.monotonic()
        post_load = self.daemon.adopt_loaded(self.session, hello.get("runstate") != "paused")
        self.job.status, self.job.step = "completed", "resumed"
        self.job.stats = {
            "ack": {k: v for k, v in ack.items() if k != "digests"},
            "passes": self.session.passes,
        }
        self.daemon.save_job(self.job)
        log.info("incoming VM %s resumed (job %s)", vm.name, self.job.id)
        with contextlib.suppress(OSError):
            send_frame(self.conn, "resumed", resume_ms=(time.monotonic() - t0) * 1e3,
                       post_load=post_load)

    def _check_receiving(self) -> None:
        assert self.job is not None
        if self.daemon.stopping:
            raise PeerError("destination host is shutting down", self.step)
        if self.job.cancel.is_set():
            raise MigrationError("cancelled by the operator on the destination", self.step)

    def _fail(self, reason: str) -> None:
        self._close_channels()
        if self.populator is not None:
            self.populator.stop()
        if self.job is not None and self.job.status == "completed":
            log.warning("incoming VM %s: %s (after it resumed here)", self.job.vm, reason)
            return
        if self.session is not None:
            self.session.abort()
        log.warning("incoming migration failed at %s: %s", self.step, reason)
        if self.job is not None:
            self.job.status, self.job.error, self.job.step = "failed", reason, self.step
            self.daemon.save_job(self.job)
        with contextlib.suppress(OSError):
            send_frame(self.conn, "error", step=self.step, reason=reason)
            self.conn.shutdown(socket.SHUT_WR)
            self._drain()

    def _drain(self) -> None:
        """Read and drop what the source still sends, so our error frame is not lost
        to a reset; give up after a second."""
        self.conn.settimeout(0.2)
        end = time.monotonic() + 1.0
        buf = bytearray(1 << 16)
        while time.monotonic() < end:
            try:
                if self.conn.recv_into(buf) == 0:
                    return
            except TimeoutError:
                continue
            except OSError:
                return
