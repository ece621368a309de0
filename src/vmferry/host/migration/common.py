"""What both migration workers share: parameters, bounds, peers' control APIs, and how a
failure from the other host is worded.

Theory of operation
-------------------
The exchange itself is the channel's (:mod:`vmferry.migration.channel`): typed frames,
one transition table, the switchover rules.  The workers drive it over a
:class:`~vmferry.host.transport.Channel` and keep the sans-IO sessions in charge of the
stream.  A failure the peer reports arrives as a
:class:`~vmferry.migration.channel.Status` -- an error kind, the step that failed, a
message -- and turns back into the same error class (``Status.exception``); the job's
error text names the step and the class (:func:`remote_text`).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from vmferry.errors import (
    ApiError,
    ConfigError,
    HostError,
    KernelError,
    MigrationError,
    PeerError,
    VmferryError,
)
from vmferry.host.client import HostClient
from vmferry.host.faults import Fault
from vmferry.host.files import ImagesDir
from vmferry.host.models import MigrationParamsModel, validate
from vmferry.host.records import HostedVm, Incoming, Job
from vmferry.host.states import Runstate
from vmferry.host.store import Store
from vmferry.host.tls import TlsConfig, client_context, explain
from vmferry.host.transport import SocketLink
from vmferry.machine.vm import VM
from vmferry.migration.channel import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams

HELLO_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0
STATS_EVERY_S = 0.1
#: the destination's socket receive buffer: a bounded backlog at the switchover (less to
#: drain while the guest is paused, and a known amount for the downtime prediction)
RECEIVE_BUFFER = 2 * 1024 * 1024
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


class MigrationHost(Protocol):
    """What the workers need of the host daemon (:class:`vmferry.host.daemon.HostDaemon`
    is one): the workers do not import the daemon, which imports them."""

    @property
    def name(self) -> str: ...
    @property
    def control_url(self) -> str: ...
    @property
    def token(self) -> str | None: ...
    @property
    def tls(self) -> TlsConfig | None: ...
    @property
    def lock(self) -> AbstractContextManager[Any]: ...
    @property
    def images(self) -> ImagesDir: ...
    @property
    def store(self) -> Store: ...
    @property
    def stopping(self) -> bool: ...

    def save_job(self, job: Job) -> None: ...
    def publish_job(self, job: Job) -> None: ...
    def forget_job(self, job: Job) -> None: ...
    def get_job(self, job_id: str) -> Job: ...
    def end_source_job(self, hosted: HostedVm, runstate: Runstate | str,
                       note: str = "") -> None: ...  # fmt: skip
    def undefine(self, name: str) -> None: ...
    def claim_token(self, token: object) -> Incoming | None: ...
    def build_vm(self, definition: Mapping[str, Any]) -> VM: ...
    def adopt_loaded(self, session: DestinationSession, running: bool) -> dict[str, Any]: ...


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


def remote_text(status: Status) -> str:
    """A peer's failure for an operator: the error class it raised and its message
    (``ChecksumMismatch: RAM_PAGES record checksum mismatch``)."""
    exc = status.exception()
    if isinstance(exc, MigrationError):
        return f"{type(exc).__name__}: {exc.reason}"
    if isinstance(exc, KernelError | ApiError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {status.message}"


def status_json(status: Status) -> dict[str, Any]:
    """A peer's status as a job records it: the class name, step, message, code."""
    return {"kind": type(status.exception()).__name__, "step": status.step,
            "message": status.message, "code": status.code}  # fmt: skip


def check_peer_tls(tls: TlsConfig | None, url: str) -> None:
    """A TLS host talks only to TLS peers; a plaintext host cannot talk to a TLS one."""
    if tls is not None and not url.startswith("https://"):
        raise ApiError(502, f"this host serves TLS and refuses the plaintext destination "
                            f"{url} (give its https:// URL; it must serve with --tls-dir)",
                       "PeerNotTls", "setup")  # fmt: skip
    if tls is None and url.startswith("https://"):
        raise ApiError(502, f"destination {url} serves TLS and this host has no certificate "
                            "of its cluster (serve this host with --tls-dir)", "PeerTls",
                       "setup")  # fmt: skip


def ask_destination(url: str, body: dict[str, Any], token: str | None,
                    tls: TlsConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """POST /v1/incoming on the destination (with the cluster's token): its one-time token
    and capabilities.  ApiError 502 if it cannot be reached or answers nonsense; its own
    refusal (a name it holds: 409) keeps the destination's status."""
    try:
        check_peer_tls(tls, url)
        ctx = client_context(tls)
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
                        tls=client_context(tls))
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


def dial(address: tuple[str, int], timeout: float, tls: TlsConfig | None) -> SocketLink:
    """A connection to a destination's migration listener (TLS when this host serves
    it), with Nagle off: control frames are small and waited for."""
    host, port = address
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is None:
        return SocketLink(sock)
    try:
        return SocketLink(tls.client_context().wrap_socket(sock))
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise PeerError(explain(exc, f"destination {host}:{port}", server=False),
                        "handshake") from exc
