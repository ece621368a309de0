"""Migration workers: the source's sending thread and the destination's receiving one.

Both keep the sans-IO sessions in charge of *what* happens; this module only moves bytes
and turns every way a connection can fail into a session failure with the step named.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, BinaryIO

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
from vmferry.host.client import HostClient
from vmferry.host.clocks import MonotonicClock
from vmferry.host.faults import CutConnection, Fault, apply
from vmferry.host.runner import VmRunner
from vmferry.host.tls import TlsConfig, explain
from vmferry.host.transport import (
    readable,
    recv_frame,
    recv_into_decoder,
    send_buffers,
    send_frame,
)
from vmferry.host.vcpus import Populator
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession, describe_failure
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import MAJOR, MINOR, StreamDecoder

if TYPE_CHECKING:  # avoids an import cycle at run time
    from vmferry.host.daemon import HostDaemon, HostedVm, Job

log = logging.getLogger("vmferry.host.migration")

HELLO_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0
ACK_TIMEOUT_S = 120.0
STATS_EVERY_S = 0.1


HOST_PARAMS = ("fault", "stream_file")


def destination_ok(post_load: dict[str, Any]) -> bool:
    """Whether every handler's post-load work succeeded on the destination.  It runs after
    COMMIT: a failure there cannot give the VM back to the source, so the migration
    completes and this flag (with each handler's report) says what went wrong."""
    return all(r.get("ok", True) for r in post_load.values() if isinstance(r, dict))


def parse_params(raw: dict[str, Any]) -> tuple[MigrationParams, Fault | None]:
    known = {
        "downtime_limit_ms",
        "max_bandwidth_mib",
        "offline",
        "max_passes",
        "auto_converge",
        "verify",
        "compat",
        "allow_degraded",
        *HOST_PARAMS,
    }
    unknown = set(raw) - known
    if unknown:
        raise ApiError(400, f"unknown migration parameters {sorted(unknown)}")
    try:
        fault = Fault.parse(raw["fault"]) if raw.get("fault") else None
        params = MigrationParams(**{k: v for k, v in raw.items() if k not in HOST_PARAMS})
    except (TypeError, ConfigError) as exc:
        raise ApiError(400, f"bad migration parameters: {exc}") from exc
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


def start_source_job(
    daemon: HostDaemon, hosted: HostedVm, destination: str, raw: dict[str, Any]
) -> Job:
    params, fault = parse_params(raw)
    assert hosted.vm is not None and hosted.runner is not None
    incoming = _ask_destination(
        destination,
        {
            "vm": hosted.name,
            "definition": hosted.definition,
            "verify": params.verify,
            "peer": daemon.control_url,
        },
        daemon.token,
        daemon.tls,
    )
    job = daemon.new_job(hosted.name, "source", destination, {**raw})
    prev_state = hosted.runstate
    hosted.runstate = "migrating"
    daemon.store.set_runstate(hosted.name, "migrating")
    worker = SourceWorker(daemon, hosted, job, params, fault, incoming, prev_state)
    job.thread = threading.Thread(target=worker.run, name=f"mig-src-{job.id}", daemon=True)
    job.thread.start()
    return job


class SourceWorker:
    def __init__(
        self,
        daemon: HostDaemon,
        hosted: HostedVm,
        job: Job,
        params: MigrationParams,
        fault: Fault | None,
        incoming: dict[str, Any],
        prev_state: str,
    ) -> None:
        self.daemon, self.hosted, self.job = daemon, hosted, job
        self.params, self.fault, self.incoming = params, fault, incoming
        self.prev_state = prev_state
        self.committed = False
        assert hosted.vm is not None and hosted.runner is not None
        self.runner: VmRunner = hosted.runner
        self.session = SourceSession(hosted.vm, params, MonotonicClock(), guest=self.runner)
        self._last_stats = 0.0
        path = job.params.get("stream_file")
        self.tee: BinaryIO | None = open(path, "wb") if path else None  # noqa: SIM115

    def run(self) -> None:
        sock: socket.socket | None = None
        try:
            self._preflight()
            sock = self._connect()
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
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            if self.tee is not None:
                self.tee.close()

    def _preflight(self) -> None:
        with self.runner.lock:  # handlers inspect device state the guest's thread changes
            warnings = self.session.preflight(self.incoming.get("capabilities"))
        for w in warnings:
            log.warning("job %s pre-flight: %s", self.job.id, w)

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
        send_frame(
            sock,
            "hello",
            token=self.incoming["token"],
            stream_version=[MAJOR, MINOR],
            runstate=self.prev_state,
            source=self.daemon.name,
        )
        reply = recv_frame(sock)
        if reply["type"] != "welcome":
            raise PeerError(f"destination refused: {reply.get('reason', reply)}", "handshake")
        sock.settimeout(IDLE_TIMEOUT_S)
        return sock

    def _phase(self) -> str:
        st = self.session.status
        return {Status.SETUP: "setup", Status.ACTIVE: "active", Status.DEVICE: "device"}.get(
            st, "ack"
        )

    def _send_stream(self, sock: socket.socket) -> None:
        bufs = self.session.start()
        first = True
        while bufs:
            if self.job.cancel.is_set():
                raise MigrationError("cancelled by the operator", self.session.current_step())
            phase = "setup" if first else self._phase()
            first = False
            delay = self.session.pacing_delay()
            if delay > 0:
                time.sleep(min(delay, 0.5))
            # Before END the destination speaks only to report an error; after END it
            # answers LOADED, so the check must come before a send, never after one.
            if readable(sock):
                reason = self._peer_reason(sock) or "destination closed the connection"
                raise PeerError(reason, self.session.current_step())
            wire = apply(self.fault, phase, bufs)
            send_buffers(sock, wire)
            if self.tee is not None:
                self.tee.writelines(wire)
            self._publish()
            bufs = self.session.next_buffers()
            self.job.status = self.session.status.value

    def _await_ack(self, sock: socket.socket) -> None:
        if self.params.verify:  # taken now, while the destination loads, not in downtime
            self.session.switchover_digests()
        if self.fault is not None and self.fault.phase == "ack":
            apply(self.fault, "ack", [])
        sock.settimeout(ACK_TIMEOUT_S)
        try:
            reply = recv_frame(sock)
        except PeerError as exc:
            raise PeerError(str(exc), "awaiting destination load") from exc
        if reply["type"] != "loaded":
            raise PeerError(
                f"destination failed: {reply.get('reason', reply)}",
                str(reply.get("step", "destination load")),
            )
        ack = reply.get("ack", {})
        self.committed = True
        send_frame(sock, "commit")
        try:
            resumed = recv_frame(sock)
        except (PeerError, OSError) as exc:
            raise PeerError(
                f"no resume confirmation after commit ({exc}); the destination "
                "may be running the VM, so the source stays paused",
                "commit",
            ) from exc
        if resumed["type"] != "resumed":
            raise PeerError(f"destination failed after commit: {resumed}", "commit")
        stats = self.session.complete(ack)
        verification = self._verify(ack)
        post_load = resumed.get("post_load", {})
        self.job.stats = {**stats.to_json(), "verification": verification,
                          "source_report": self.hosted.vm.report() if self.hosted.vm else {},
                          "destination_report": post_load,
                          "destination_ok": destination_ok(post_load)}
        self.job.status = "completed"
        if not self.job.stats["destination_ok"]:
            log.warning("job %s: post-load work failed on the destination: %s", self.job.id,
                        sorted(k for k, r in post_load.items() if not r.get("ok", True)))
        self.hosted.runstate = "migrated"
        self.hosted.release()
        self.daemon.store.set_runstate(self.hosted.name, "migrated")
        self.daemon.save_job(self.job)
        log.info(
            "job %s: %s migrated, downtime %.1f ms",
            self.job.id,
            self.hosted.name,
            stats.downtime.total_ms,
        )

    def _verify(self, ack: dict[str, Any]) -> dict[str, Any]:
        if not self.params.verify:
            return {"requested": False}
        src = self.session.switchover_digests()
        dst = ack.get("digests", {})
        return {
            "requested": True,
            "source": src,
            "destination": dst,
            "ram_equal": src.get("ram") == dst.get("ram"),
            "vcpu_equal": src.get("vcpu") == dst.get("vcpu"),
            "verified": bool(dst) and src == dst,
        }

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

    def _fail(self, reason: str, step: str | None = None, cancelled: bool = False) -> None:
        step = step or self.session.current_step()
        if self.session.status is Status.COMPLETED:
            return
        if self.committed:  # past the point of no return: never run the guest twice
            self.job.status, self.job.error, self.job.step = "failed", reason, "commit"
            self.job.stats = {**self.session.stats.to_json(), "status": "failed"}
            self.hosted.runstate = "paused"
            self.daemon.store.set_runstate(self.hosted.name, "paused")
            self.daemon.save_job(self.job)
            log.error("job %s failed after commit: %s", self.job.id, reason)
            return
        stats = self.session.fail(step, reason, cancelled=cancelled)
        self.job.stats = stats.to_json()
        self.job.status = stats.status.value
        self.job.error, self.job.step = reason, step
        self.hosted.runstate = self.prev_state
        self.daemon.store.set_runstate(self.hosted.name, self.prev_state)
        self.daemon.save_job(self.job)
        log.warning("job %s %s at %s: %s", self.job.id, self.job.status, step, reason)


# --- destination -------------------------------------------------------------------------


def serve_incoming(daemon: HostDaemon, listener: socket.socket) -> None:
    while not daemon.stopping:
        try:
            conn, addr = listener.accept()
        except OSError:
            return
        threading.Thread(
            target=DestinationWorker(daemon, conn, addr).run, name=f"mig-dst-{addr[1]}", daemon=True
        ).start()


class DestinationWorker:
    def __init__(self, daemon: HostDaemon, conn: socket.socket, addr: Any) -> None:
        self.daemon, self.conn, self.addr = daemon, conn, addr
        self.session: DestinationSession | None = None
        self.job: Job | None = None
        self.step = "handshake"
        self.populator: Populator | None = None

    def _tls(self) -> bool:
        """The TLS handshake, when this host serves TLS; False (refused) if it failed."""
        if self.daemon.tls is None:
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
            if self.populator is not None:
                self.populator.stop()
            with contextlib.suppress(OSError):
                self.conn.close()

    def _handshake(self) -> dict[str, Any] | None:
        self.conn.settimeout(HELLO_TIMEOUT_S)
        try:
            hello = recv_frame(self.conn)
        except (PeerError, OSError) as exc:
            self._refuse(f"no valid hello: {exc}")
            return None
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
        if hello.get("stream_version", [0])[0] != MAJOR:
            self._refuse(f"stream version {hello.get('stream_version')} not supported")
            return None
        self.session = DestinationSession(
            MonotonicClock(), verify=inc.verify, check_config=self._check_name(inc.vm),
            factory=self._build_staging,
        )
        send_frame(self.conn, "welcome", host=self.daemon.name)
        self.conn.settimeout(IDLE_TIMEOUT_S)
        self.job.status = "active"
        return hello

    def _build_staging(self, definition: Any) -> Any:
        """The staging VM, its RAM faulted in from a thread while the stream arrives."""
        vm = self.daemon.build_vm(definition)
        self.populator = Populator(vm.ram)
        return vm

    @staticmethod
    def _check_name(expected: str) -> Any:
        def check(config: Any) -> None:
            if config.get("name") != expected:
                raise ConfigError(
                    f"stream carries VM {config.get('name')!r}, expected {expected!r}"
                )

        return check

    def _refuse(self, reason: str) -> None:
        msg = f"refused migration connection from {self.addr[0]}:{self.addr[1]}: {reason}"
        log.warning(msg)
        self.daemon.store.log("refused", msg)
        with contextlib.suppress(OSError):
            send_frame(self.conn, "reject", reason=reason)

    def _receive(self, hello: dict[str, Any]) -> None:
        assert self.session is not None and self.job is not None
        decoder = StreamDecoder()
        self.step = "receiving stream"
        while not decoder.done:
            if self.daemon.stopping:
                raise PeerError("destination host is shutting down", self.step)
            if recv_into_decoder(self.conn, decoder) == 0:
                decoder.eof()
            for rec in decoder.events():
                self.session.receive(rec)
                self.step = f"receiving stream (pass {self.session.passes + 1})"
        self.step = "load"
        if self.populator is not None:
            self.populator.stop()
        vm = self.session.vm
        assert vm is not None
        ack = self.session.finish(start=False)
        send_frame(self.conn, "loaded", ack=ack)
        self.step = "awaiting commit"
        commit = recv_frame(self.conn)
        if commit["type"] != "commit":
            raise PeerError(f"expected commit, got {commit['type']}", self.step)
        self.step = "resume"
        t0 = time.monotonic()
        post_load = self.daemon.adopt_loaded(self.session, hello.get("runstate") != "paused")
        send_frame(self.conn, "resumed", resume_ms=(time.monotonic() - t0) * 1e3,
                   post_load=post_load)
        self.job.status = "completed"
        self.job.stats = {
            "ack": {k: v for k, v in ack.items() if k != "digests"},
            "passes": self.session.passes,
        }
        self.daemon.save_job(self.job)
        log.info("incoming VM %s resumed (job %s)", vm.name, self.job.id)

    def _fail(self, reason: str) -> None:
        if self.populator is not None:
            self.populator.stop()
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
