"""One host: VMs in this process, a control API, a migration listener, a store.

The daemon is the only place where the sans-IO engine meets sockets and threads:

* the control API (HTTP + JSON, :mod:`vmferry.host.api`) runs on asyncio;
* each VM's guest time runs in a :class:`~vmferry.host.runner.VmRunner` thread;
* each migration runs in a worker thread with blocking sockets
  (:mod:`vmferry.host.migration`): the data path is ``sendmsg`` of views and
  ``recv_into`` the decoder's buffer, which release the GIL while the kernel copies.

``self.lock`` guards ``vms``, ``jobs`` and ``incoming``; the store has its own lock.

Runstates: ``running``, ``paused``, ``migrating`` (a source job owns the VM: ``HostedVm.job``),
``migrated`` (it runs on the destination now; this is the husk), ``needs-attention`` (the
daemon cannot tell whether the VM runs elsewhere; ``HostedVm.note`` says what to do) and
``failed``.  The check that a VM may migrate and its ``migrating`` mark are one step under
``self.lock``, so a second request for the same VM gets 409 naming the running job.

A restarted daemon has lost every guest's memory.  :meth:`HostDaemon.recover` reads the
records at once (the control API answers from the first moment; such VMs are
``recovering``), then :meth:`HostDaemon.settle_recovered`, in a thread of its own,
rebuilds running and paused VMs from their definitions but leaves them *paused*, flagged
``memory_lost`` with a note that ``vm show`` and the log print; a VM left ``migrating`` is
settled from its job's persisted progress (and, if COMMIT may have been sent, by asking
the destination); a ``migrated`` husk is never booted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from vmferry.errors import ApiError, ConfigError, HostError, VmferryError
from vmferry.host.client import HostClient
from vmferry.host.events import EventBus
from vmferry.host.files import ImagesDir
from vmferry.host.iommu import probe_host
from vmferry.host.migration import (
    ask_destination_outcome,
    parse_params,
    serve_incoming,
    start_source_job,
)
from vmferry.host.models import VmDefinitionModel, validate
from vmferry.host.records import HostedVm, Incoming, Job
from vmferry.host.resources import check_fits
from vmferry.host.runner import VmRunner
from vmferry.host.states import UNFINISHED, JobStatus, Runstate
from vmferry.host.store import Store
from vmferry.host.tls import TlsConfig, client_context
from vmferry.host.vcpus import VcpuThreads, install_kick_handler
from vmferry.machine.vm import VM, HostContext, VmDefinition, create_vm, load_definition
from vmferry.machine.x86 import kvm_status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams

__all__ = ["HostDaemon", "HostedVm", "Incoming", "Job", "lock_state_dir"]

log = logging.getLogger("vmferry.host")

TOKEN_TTL_S = 120.0
#: how long a restarting daemon asks a destination what became of a committed migration
RECOVER_ASK_S = 2.0


class HostDaemon:
    def __init__(
        self,
        name: str,
        state_dir: Path,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        migration_listen: tuple[str, int] | None = None,
        context: HostContext | None = None,
        token: str | None = None,
        tls: TlsConfig | None = None,
        images_dir: Path | None = None,
    ) -> None:
        self.name = name
        #: mutual TLS for the control API, the migration listener and calls to peers
        self.tls = tls
        #: the cluster's control-API bearer token: required of every request here, and
        #: presented to peers
        self.token = token
        self.context = with_vcpu_threads(
            with_iommu_probe(context if context is not None else HostContext(name)))
        #: whether this host can run x86_64 guests on KVM, and why not
        self.kvm = kvm_status()
        self.state_dir = state_dir
        self.listen = listen
        self.migration_listen = migration_listen or (listen[0], 0)
        self.lock = threading.RLock()
        self.vms: dict[str, HostedVm] = {}
        self.jobs: dict[str, Job] = {}
        self.incoming: dict[str, Incoming] = {}
        self.control_url = ""
        self.migration_address: tuple[str, int] = ("", 0)
        self._state_lock = lock_state_dir(state_dir)
        #: where save, restore and stream_file paths live (nothing outside it is touched)
        self.images = ImagesDir(images_dir or state_dir / "images", state_dir)
        #: how long a reservation from /v1/incoming holds a VM name without a source
        self.reservation_ttl_s = TOKEN_TTL_S
        self.store = Store(state_dir / "host.sqlite3")
        self.events = EventBus()
        self.store.on_vm_change = self._vm_changed
        self.store.on_log = self._logged
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        #: VMs :meth:`recover` found, still to rebuild, with their runstate before
        self._recovering: list[tuple[HostedVm, str]] = []

    def _vm_changed(self, name: str, runstate: str) -> None:
        self.events.publish("vm", {"name": name, "runstate": runstate})

    def _logged(self, kind: str, message: str) -> None:
        self.events.publish("host", {"kind": kind, "message": message})

    # --- start-up and shut-down ------------------------------------------------------

    def recover(self, settle: bool = True) -> None:
        """Reload VMs and jobs from the store after a (re)start.  No guest memory survived
        a restart: see the module docstring for what each runstate comes back as.  Without
        ``settle`` the VMs stay ``recovering`` until :meth:`settle_recovered` runs."""
        for row in self.store.jobs():
            self.jobs[row.id] = Job(row.id, row.vm, row.role, row.peer, row.params, row.status,
                                    row.stats, row.error, row.step, row.created,
                                    progress=dict(row.progress))
        # a VM that arrived here but whose job never got to "completed" was never
        # confirmed to its source, which resumes it: drop our copy
        last_arrival = {j.vm: j for j in sorted(self.jobs.values(), key=lambda j: j.created)
                        if j.role == "destination"}
        arrived_unconfirmed = {vm for vm, j in last_arrival.items()
                               if j.step == "resume" and j.status is not JobStatus.COMPLETED}
        notes = self.store.notes()
        self._recovering = []
        for name, definition, runstate in self.store.vms():
            if name in arrived_unconfirmed and runstate in ("running", "paused"):
                log.warning("VM %s: its arrival (COMMIT) was never confirmed; dropped", name)
                self.store.delete_vm(name)
                continue
            hosted = HostedVm(name, definition, runstate, note=notes.get(name, ""))
            self.vms[name] = hosted
            if runstate in ("running", "paused", "migrating"):
                # rebuilt by settle_recovered; the store keeps the old runstate meanwhile
                self._recovering.append((hosted, Runstate(runstate)))
                hosted.move(Runstate.RECOVERING)
                hosted.note = (f"the host daemon restarted; this VM ({runstate} before) is "
                               "being rebuilt from its definition")
        # jobs that were under way end here, except a source job past COMMIT whose VM is
        # left migrating: settle_recovered asks its destination how it ended
        settling = {h.name for h, was in self._recovering if was is Runstate.MIGRATING}
        for job in self.jobs.values():
            if job.status in UNFINISHED and not (
                job.role == "source" and job.progress.get("commit_sent") and job.vm in settling
            ):
                self._restarted(job)
        if settle:
            self.settle_recovered()

    def _restarted(self, job: Job) -> None:
        job.move(JobStatus.FAILED, job.step or "unknown",
                 "the host daemon restarted during the job")
        self.save_job(job)

    def settle_recovered(self) -> None:
        """Rebuild (or settle) the VMs :meth:`recover` left ``recovering``, one by one.
        Runs in a thread of its own while the control API answers."""
        pending, self._recovering = self._recovering, []
        if pending:
            log.info("recovering %d VMs in the background: %s", len(pending),
                     ", ".join(h.name for h, _ in pending))
        for hosted, was in pending:
            if self._stopping.is_set():
                return
            try:
                if was is Runstate.MIGRATING:
                    self._recover_migrating(hosted)
                else:
                    self._rebuild_lost(hosted, "", was)
            except Exception as exc:  # one VM's trouble must not strand the others
                log.exception("VM %s: recovery failed", hosted.name)
                with self.lock:
                    hosted.move(Runstate.FAILED)
                    hosted.note = f"cannot rebuild after a restart: {exc}"
                self.store.set_runstate(hosted.name, hosted.runstate, hosted.note)

    def _rebuild_lost(self, hosted: HostedVm, why: str, was: str | None = None) -> None:
        """Rebuild a VM whose memory did not survive a restart: paused, flagged, noted."""
        was = was or hosted.runstate
        note = (f"{why}the host daemon restarted and this VM's memory did not survive; it "
                f"was rebuilt from its definition, paused (it was {was}). `vm start` runs "
                f"it from fresh memory, `vm destroy` removes it.")
        try:
            vm = self.build_vm(hosted.definition)
        except VmferryError as exc:
            log.error("cannot restore VM %s: %s", hosted.name, exc)
            with self.lock:
                hosted.move(Runstate.FAILED)
                hosted.note = f"cannot rebuild after a restart: {exc}"
        else:
            if self._stopping.is_set():  # the daemon stops: nobody will release it
                vm.close()
                return
            with self.lock:
                hosted.vm, hosted.runner = vm, VmRunner(vm)
                hosted.move(Runstate.PAUSED)
                hosted.memory_lost, hosted.note = True, note
        self.store.set_runstate(hosted.name, hosted.runstate, hosted.note)
        log.warning("VM %s: %s", hosted.name, hosted.note)

    def _recover_migrating(self, hosted: HostedVm) -> None:
        """A VM left ``migrating``: settle it from its source job's persisted progress."""
        jobs = [j for j in self.jobs.values() if j.vm == hosted.name and j.role == "source"]
        job = max(jobs, key=lambda j: j.created) if jobs else None
        if job is None or not job.progress.get("commit_sent"):
            # the destination resumes only on COMMIT, which was never sent: it has nothing
            self._rebuild_lost(hosted, "a migration was under way before COMMIT; ", "migrating")
            return
        outcome = ask_destination_outcome(job.peer, job.progress.get("peer_job"), hosted.name,
                                          self.token, wait_s=RECOVER_ASK_S, tls=self.tls)
        if outcome == "resumed":
            hosted.move(Runstate.MIGRATED)
            hosted.note = f"runs on {job.peer} (job {job.id})"
            job.move(JobStatus.COMPLETED,
                     "confirmed by the destination after a restart of this daemon", "")
            self.save_job(job)
            self.store.set_runstate(hosted.name, hosted.runstate, hosted.note)
        elif outcome == "not-resumed":
            self._rebuild_lost(hosted, f"the destination {job.peer} says it never resumed "
                                       f"the VM (job {job.id}); ", "migrating")
        else:
            hosted.move(Runstate.NEEDS_ATTENTION)
            hosted.note = (
                f"the host daemon restarted after COMMIT of job {job.id} was sent to "
                f"{job.peer}, and {job.peer} cannot tell ({outcome}) whether it runs the VM. "
                f"Check `vmferry vm show {hosted.name} --host {job.peer}`: if it runs there, "
                f"`vmferry vm destroy {hosted.name}` here; if not, `vmferry vm start "
                f"{hosted.name}` here runs it from its definition (its memory was lost).")
            self.store.set_runstate(hosted.name, hosted.runstate, hosted.note)
            log.error("VM %s needs attention: %s", hosted.name, hosted.note)
        if job.status in UNFINISHED:
            self._restarted(job)

    def build_vm(self, definition: Mapping[str, Any]) -> VM:
        """A VM as this host builds it (its profile and platform apply)."""
        return create_vm(definition, self.context)

    def _boot(self, hosted: HostedVm, start: bool) -> None:
        hosted.vm = self.build_vm(hosted.definition)
        hosted.runner = VmRunner(hosted.vm)
        if start:
            hosted.runner.resume()
        hosted.move(Runstate.RUNNING if start else Runstate.PAUSED)

    def start_migration_listener(self) -> None:
        sock = socket.create_server(self.migration_listen, reuse_port=False)
        self._listener = sock
        self.migration_address = sock.getsockname()[:2]
        threading.Thread(
            target=serve_incoming, args=(self, sock), name="mig-listener", daemon=True
        ).start()

    def write_ready_file(self) -> None:
        info = {
            "name": self.name,
            "control_url": self.control_url,
            "pid": os.getpid(),
            "migration_address": list(self.migration_address),
        }
        tmp = self.state_dir / "ready.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.state_dir / "ready.json")

    def shutdown(self) -> None:
        self._stopping.set()
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancel.set()
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout=5)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self.lock:
            for hosted in self.vms.values():
                if hosted.runner is not None:
                    hosted.runner.stop()
        with contextlib.suppress(OSError):
            (self.state_dir / "ready.json").unlink()
        self.events.close()
        self.store.close()
        self._state_lock.close()  # closing the file releases the lock

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # --- VMs -------------------------------------------------------------------------

    def get_vm(self, name: str) -> HostedVm:
        with self.lock:
            hosted = self.vms.get(name)
        if hosted is None:
            raise ApiError(404, f"no VM named {name!r} on host {self.name}")
        return hosted

    def check_definition(self, definition: object) -> VmDefinition:
        """A definition this host can build: well-formed (ApiError 400 naming the field)
        and within the host's resources (ApiError 422 ``VmTooLarge``).  Allocates
        nothing."""
        model = validate(VmDefinitionModel, definition, "VM definition")
        check_fits(model, self.name)
        try:
            return load_definition(definition)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ApiError(400, f"invalid VM definition: {exc}", "ConfigError") from exc

    def create(self, definition: dict[str, Any], start: bool = False) -> HostedVm:
        parsed = self.check_definition(definition)
        with self.lock:
            self.check_name_free(parsed.name)
            self._check_assignment(parsed.name, parsed.to_dict())
            hosted = HostedVm(parsed.name, parsed.to_dict(), Runstate.PAUSED)
            try:
                self._boot(hosted, start)
            except (VmferryError, ValueError, OverflowError, UnicodeError) as exc:
                hosted.release()
                raise ApiError(400, f"cannot create VM: {exc}", type(exc).__name__) from exc
            self.vms[parsed.name] = hosted
        self.store.put_vm(hosted.name, hosted.definition, hosted.runstate)
        log.info("created VM %s (%s)", hosted.name, hosted.runstate)
        return hosted

    def check_name_free(self, name: str, leftover_ok: bool = False) -> None:
        """HTTP 409 if a VM of that name is here or on its way here.  With
        ``leftover_ok``, the record a VM left when it migrated away does not count: a VM
        coming back replaces it."""
        with self.lock:
            here = self.vms.get(name)
            if here is not None and leftover_ok and here.runstate is Runstate.MIGRATED:
                here = None
            if here is not None or name in {i.vm for i in self.incoming.values()}:
                raise ApiError(409, f"a VM named {name!r} exists on host {self.name}",
                               "VmExists")

    def undefine(self, name: str) -> None:
        """Forget the record a VM left behind when it migrated away."""
        with self.lock:
            hosted = self.vms.get(name)
            if hosted is None or hosted.runstate is not Runstate.MIGRATED:
                return
            del self.vms[name]
        self.store.delete_vm(name)
        log.info("undefined VM %s (it migrated away)", name)

    def _groups_of(self, definition: Mapping[str, Any]) -> dict[int, str]:
        """IOMMU group -> host device, for the host functions a definition assigns."""
        probe = self.context.iommu
        out: dict[int, str] = {}
        if probe is None:
            return out
        for entry in definition.get("devices", []) or []:
            if isinstance(entry, Mapping) and isinstance(entry.get("host_device"), str):
                group = probe.groups.get(entry["host_device"])
                if group is not None:
                    out[int(group)] = entry["host_device"]
        return out

    def _check_assignment(self, name: str, definition: Mapping[str, Any]) -> None:
        """VFIO's viability rule: an IOMMU group belongs to one VM at a time.
        Call with ``self.lock`` held."""
        wanted = self._groups_of(definition)
        if not wanted:
            return
        others = [(h.name, h.definition) for h in self.vms.values()
                  if h.name != name and h.runstate != "migrated"]
        others += [(i.vm, i.definition) for i in self.incoming.values() if i.vm != name]
        for other, other_def in others:
            clash = set(wanted) & set(self._groups_of(other_def))
            if clash:
                group = min(clash)
                raise ApiError(409, f"IOMMU group {group} ({wanted[group]}) is assigned to "
                                    f"VM {other} on host {self.name}")

    def set_running(self, name: str, run: bool) -> HostedVm:
        """Start or pause a VM.  Starting a ``needs-attention`` VM is the operator's word
        that it runs nowhere else: its paused guest (or, if its memory was lost, a fresh
        one from its definition) runs here."""
        with self.lock:
            hosted = self.get_vm(name)
            if hosted.runstate is Runstate.NEEDS_ATTENTION and run:
                if hosted.vm is None:
                    self._boot(hosted, start=False)
                    hosted.memory_lost = True
                hosted.move(Runstate.PAUSED)
            if hosted.runstate not in ("running", "paused") or hosted.runner is None:
                why = f" ({hosted.note})" if hosted.note else ""
                job = f" in job {hosted.job}" if hosted.job else ""
                raise ApiError(409, f"VM {name} is {hosted.runstate}{job}{why}")
            if run:
                hosted.runner.resume()
            else:
                hosted.runner.pause()
            hosted.move(Runstate.RUNNING if run else Runstate.PAUSED)
            hosted.note = "" if not hosted.memory_lost else hosted.note
            self.store.set_runstate(name, hosted.runstate, hosted.note)
        return hosted

    def destroy(self, name: str) -> None:
        with self.lock:
            hosted = self.get_vm(name)
            if hosted.runstate == "migrating":
                raise ApiError(409, f"VM {name} is migrating in job {hosted.job}; cancel the "
                                    "job first")
            if hosted.runstate == "saving":
                raise ApiError(409, f"VM {name} is being saved; destroy it once that finished")
            if hosted.runstate == "recovering":
                raise ApiError(409, f"VM {name} is being rebuilt after a restart of the host "
                                    "daemon; destroy it once that finished")
            self.vms.pop(name, None)
        hosted.release()
        self.store.delete_vm(name)
        log.info("destroyed VM %s", name)

    def begin_save(self, name: str) -> HostedVm:
        """Mark a running or paused VM ``saving`` (one check-and-mark under the lock);
        ApiError 409 otherwise.  :meth:`end_save` puts its runstate back."""
        hosted = self.get_vm(name)
        with self.lock:
            if hosted.vm is None or hosted.runner is None or hosted.runstate not in (
                "running", "paused"
            ):
                raise ApiError(409, f"VM {name} is {hosted.runstate} and cannot be saved")
            hosted.saved_from = hosted.move(Runstate.SAVING)
        return hosted

    def end_save(self, hosted: HostedVm) -> None:
        with self.lock:
            if hosted.runstate is Runstate.SAVING:
                hosted.move(hosted.saved_from)

    def adopt_loaded(self, session: DestinationSession, running: bool) -> dict[str, Any]:
        """Take in a VM a destination session loaded (by migration or from a snapshot):
        start its guest thread, run its handlers' post-load work under the runner's lock,
        record and register it.  Returns the post-load reports.  If the post-load work or
        the record's write raises, the guest thread is stopped again and nothing is
        registered."""
        vm = session.vm
        if vm is None:
            raise HostError("adopt_loaded() without a loaded VM")
        runner = VmRunner(vm)
        runstate = Runstate.RUNNING if running else Runstate.PAUSED
        definition = vm.definition.to_dict()
        if running:
            runner.resume()
        try:
            with runner.lock:
                post_load = session.resume(run=False)
            # The record is written before the VM is taken in: a destination that cannot
            # record it (disk full) must not keep running a guest whose source resumes.
            self.store.put_vm(vm.name, definition, runstate)
        except BaseException:
            runner.stop()
            with runner.lock:
                vm.pause()
            raise
        session.hand_over()
        hosted = HostedVm(vm.name, definition, runstate, vm, runner)
        with self.lock:
            self.vms[vm.name] = hosted
        return post_load

    # --- jobs ------------------------------------------------------------------------

    def new_job(self, vm: str, role: str, peer: str, params: dict[str, Any]) -> Job:
        job = Job(uuid.uuid4().hex[:12], vm, role, peer, params)
        with self.lock:
            self.jobs[job.id] = job
        self.store.put_job(job.row())
        self.publish_job(job)
        return job

    def save_job(self, job: Job) -> None:
        self.store.put_job(job.row())
        self.publish_job(job)

    def publish_job(self, job: Job) -> None:
        """Tell event subscribers the job's current state (status and statistics)."""
        self.events.publish("job", self.job_json(job))

    def get_job(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} on host {self.name}")
        return job

    def job_json(self, job: Job) -> dict[str, Any]:
        return job.row().to_json()

    def migrate(self, name: str, destination: str, params: dict[str, Any]) -> Job:
        parse_params(params)  # refuse bad parameters before anything changes
        self._check_not_self(destination)
        with self.lock:  # the check and the mark are one step
            hosted = self.get_vm(name)
            if hosted.runstate == "migrating":
                raise ApiError(409, f"VM {name} is already migrating in job {hosted.job}")
            if hosted.runstate not in ("running", "paused") or hosted.vm is None:
                raise ApiError(409, f"VM {name} is {hosted.runstate} and cannot migrate")
            job = self.new_job(name, "source", destination, {**params})
            prev_state = hosted.move(Runstate.MIGRATING)
            hosted.job = job.id
            self.store.set_runstate(name, hosted.runstate)
        return start_source_job(self, hosted, job, prev_state)

    def forget_job(self, job: Job) -> None:
        """A job refused before anything moved leaves nothing behind."""
        with self.lock:
            self.jobs.pop(job.id, None)
        self.store.delete_job(job.id)

    def end_source_job(self, hosted: HostedVm, runstate: Runstate | str, note: str = "") -> None:
        """A source job let go of its VM: record the runstate it leaves the VM in."""
        with self.lock:
            hosted.move(runstate)
            hosted.job, hosted.note = None, note
            self.store.set_runstate(hosted.name, hosted.runstate, note)

    def _check_not_self(self, destination: str) -> None:
        """HTTP 409 if ``destination`` is this host (under whatever URL)."""
        try:
            ctx = client_context(self.tls)
            info = HostClient(destination, self.token, timeout=10.0, tls=ctx).get("/v1/host")
        except HostError:
            return  # unreachable: asking it for a token reports that, with the step
        if not isinstance(info, dict):
            return
        same_url = bool(self.control_url) and info.get("control_url") == self.control_url
        same_listener = list(info.get("migration_address") or []) == list(
            self.migration_address) and self.migration_address[1] != 0
        if same_url or same_listener:
            raise ApiError(409, f"source and destination are the same host ({self.name} at "
                                f"{destination})")

    def cancel(self, job_id: str) -> Job:
        job = self.get_job(job_id)
        if job.status.finished:
            raise ApiError(409, f"job {job_id} already {job.status}")
        if job.role == "source" and job.progress.get("commit_sent"):
            raise ApiError(409, f"job {job_id} is past COMMIT: the destination {job.peer} "
                                "may already run the VM, so the migration cannot be undone; "
                                "it settles by itself (see the job's step and error)")
        job.cancel.set()
        return job

    def set_job_params(self, job_id: str, changes: dict[str, Any]) -> Job:
        """Change ``downtime_limit_ms`` / ``max_bandwidth_mib`` (null: unlimited) of a
        running source job; its worker applies them before it sends more.  HTTP 400 for
        other keys or bad values, 409 for a job that is not a running source job."""
        job = self.get_job(job_id)
        allowed = {"downtime_limit_ms", "max_bandwidth_mib"}
        if not changes or set(changes) - allowed:
            raise ApiError(400, f"only {sorted(allowed)} can change during a migration, "
                                f"got {sorted(changes)}")
        if job.role != "source" or job.status not in (JobStatus.SETUP, JobStatus.ACTIVE):
            raise ApiError(409, f"job {job_id} is a {job.role} job in status {job.status}; "
                                "only a running source job takes new parameters")
        merged = {k: job.params.get(k) for k in allowed if k in job.params}
        try:
            MigrationParams(**{**merged, **changes}).policy()
        except (TypeError, ConfigError) as exc:
            raise ApiError(400, f"bad migration parameters: {exc}") from exc
        with self.lock:
            job.retune.update(changes)
            job.params = {**job.params, **changes}
        self.save_job(job)
        log.info("job %s: parameters changed: %s", job_id, changes)
        return job

    def expect_incoming(
        self, vm_name: str, definition: dict[str, Any], verify: bool, peer: str
    ) -> tuple[Incoming, dict[str, Any]]:
        """Get ready for a VM; returns the one-time token and this host's capabilities
        for it (from a scratch VM built here: the same code that will receive it)."""
        parsed = self.check_definition(definition)
        if parsed.name != vm_name:
            raise ApiError(400, f"the definition is of VM {parsed.name!r}, not {vm_name!r}")
        self.check_name_free(vm_name, leftover_ok=True)
        # the capabilities come from a scratch VM whose RAM is never touched (zero fill)
        try:
            scratch = self.build_vm({**parsed.to_dict(), "fill": "zero"})
        except (VmferryError, ValueError, OverflowError, UnicodeError) as exc:
            raise ApiError(400, f"host {self.name} cannot run the VM: {exc}",
                           type(exc).__name__) from exc
        try:
            capabilities = scratch.capabilities()
        finally:
            scratch.close()
        with self.lock:
            self.check_name_free(vm_name, leftover_ok=True)
            job = self.new_job(vm_name, "destination", peer, {"verify": verify})
            self._check_assignment(vm_name, definition)
            inc = Incoming(
                secrets.token_hex(16), vm_name, verify, job.id,
                time.monotonic() + self.reservation_ttl_s, parsed.to_dict(),
            )
            self.incoming[inc.token] = inc
        log.info("expecting VM %s from %s (job %s)", vm_name, peer, job.id)
        return inc, capabilities

    def claim_token(self, token: object) -> Incoming | None:
        """One-time use: the token is gone whether or not it was valid."""
        with self.lock:
            self.expire_reservations()
            if not isinstance(token, str):
                return None
            return self.incoming.pop(token, None)

    def expire_reservations(self) -> int:
        """Drop reservations no source claimed in time (their ``setup`` jobs fail, the
        names are free again); called on a timer and before a token is claimed.  Returns
        how many expired."""
        with self.lock:
            now = time.monotonic()
            gone = [t for t, inc in self.incoming.items() if inc.expires < now]
            for t in gone:
                inc = self.incoming.pop(t)
                self._expire(inc)
                log.info("reservation for VM %s expired (job %s)", inc.vm, inc.job_id)
        return len(gone)

    def _expire(self, inc: Incoming) -> None:
        job = self.jobs.get(inc.job_id)
        if job is not None and job.status is JobStatus.SETUP:
            job.move(JobStatus.FAILED, "setup", "no source connected in time")
            self.save_job(job)


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Create ``state_dir`` if needed and take its lock: one daemon per state dir.
    Returns the open lock file (closing it releases the lock); HostError naming the
    other daemon's pid if one holds it, or if the directory cannot be used."""
    path = state_dir / "daemon.lock"
    if state_dir.exists() and not state_dir.is_dir():
        raise HostError(f"state dir {state_dir} is not a directory")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held for the daemon's lifetime
    except OSError as exc:
        raise HostError(f"state dir {state_dir} cannot be used: "
                        f"{exc.strerror or exc}") from exc
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "unknown"
        fh.close()
        raise HostError(f"state dir {state_dir} is in use by another vmferry host daemon "
                        f"(pid {pid})") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def with_iommu_probe(context: HostContext) -> HostContext:
    """The context with the host's IOMMU boot probe run (hosts that have IOMMUs)."""
    if context.iommu is not None:
        return context
    arch = getattr(context.profile, "arch", None)
    return dataclasses.replace(context, iommu=probe_host(arch, context.platform))


def with_vcpu_threads(context: HostContext) -> HostContext:
    """The context with this host's vCPU threads (real guests need them)."""
    if context.vcpu_threads is not None:
        return context
    with contextlib.suppress(HostError):  # not the main thread: a caller installs it
        install_kick_handler()
    return dataclasses.replace(context, vcpu_threads=VcpuThreads)
