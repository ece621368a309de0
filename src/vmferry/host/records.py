"""What a host holds: its VMs (:class:`HostedVm`), migration jobs (:class:`Job`) and the
reservations for VMs on their way here (:class:`Incoming`).

A VM's runstate and a job's status are enums with one transition table each
(:mod:`vmferry.host.states`); :meth:`HostedVm.move` and :meth:`Job.move` are the only
writers and refuse a move the table lacks.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import InitVar, dataclass, field
from typing import Any

from vmferry.host.runner import VmRunner
from vmferry.host.states import JOB_MOVES, RUNSTATE_MOVES, JobStatus, Runstate, check_move
from vmferry.host.store import JobRow
from vmferry.machine.vm import VM


@dataclass
class HostedVm:
    name: str
    definition: dict[str, Any]
    #: the runstate it starts in; afterwards :meth:`move` is the only writer
    initial: InitVar[Runstate | str]
    vm: VM | None = None
    runner: VmRunner | None = None
    #: the source job that owns the VM while it is ``migrating``
    job: str | None = None
    #: why the VM is in its runstate, for the operator (persisted with the runstate)
    note: str = ""
    #: rebuilt from its definition by a restarted daemon: the guest's memory was lost
    memory_lost: bool = False
    #: the runstate a save started from (the VM is ``saving`` meanwhile)
    saved_from: Runstate = Runstate.RUNNING

    def __post_init__(self, initial: Runstate | str) -> None:
        self._runstate = Runstate(initial)

    @property
    def runstate(self) -> Runstate:
        return self._runstate

    def move(self, to: Runstate | str) -> Runstate:
        """The one writer of the runstate: the move must be in :data:`RUNSTATE_MOVES`
        (HostError otherwise).  Returns the previous runstate."""
        was = self._runstate
        self._runstate = check_move(RUNSTATE_MOVES, f"VM {self.name}", was, Runstate(to))
        return was

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "runstate": self.runstate,
            "definition": self.definition,
        }
        if self.job is not None:
            out["job"] = self.job
        if self.note:
            out["note"] = self.note
        if self.memory_lost:
            out["memory_lost"] = True
        if self.vm is not None:
            out["memory_bytes"] = self.vm.ram.size
            out["vcpus"] = len(self.vm.vcpus)
            out["throttle_pct"] = self.vm.workload.throttle_pct
            out["pages_dirtied"] = self.vm.workload.pages_written
            out["backend"] = self.vm.backend
            guest = self.vm.guest_info()
            if guest is not None:
                out["guest"] = guest
            # handlers read device and IOMMU state the guest's thread changes
            lock = self.runner.lock if self.runner is not None else contextlib.nullcontext()
            with lock:
                report = self.vm.report()
            if report:
                out["report"] = report
        return out

    def release(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None


@dataclass
class Job:
    id: str
    vm: str
    role: str  # source | destination
    peer: str
    params: dict[str, Any]
    #: the status it starts in; afterwards :meth:`move` is the only writer
    initial: InitVar[JobStatus | str] = JobStatus.SETUP
    stats: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    step: str = ""
    created: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)
    #: parameter changes for the running migration, taken by its worker (under the lock)
    retune: dict[str, Any] = field(default_factory=dict)
    thread: threading.Thread | None = None
    #: persisted engine bookkeeping: ``peer_job``, ``commit_sent`` (see store.py)
    progress: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self, initial: JobStatus | str) -> None:
        self._status = JobStatus(initial)

    @property
    def status(self) -> JobStatus:
        return self._status

    def move(self, to: JobStatus | str, step: str | None = None,
             error: str | None = None) -> None:  # fmt: skip
        """The one writer of the status: the move must be in :data:`JOB_MOVES`
        (HostError otherwise); ``step`` and ``error`` change with it when given."""
        self._status = check_move(JOB_MOVES, f"job {self.id}", self._status, JobStatus(to))
        if step is not None:
            self.step = step
        if error is not None:
            self.error = error

    def row(self) -> JobRow:
        return JobRow(
            self.id,
            self.vm,
            self.role,
            self.peer,
            self.status.value,
            self.params,
            self.stats,
            self.error,
            self.step,
            self.created,
            time.time(),
            dict(self.progress),
        )


@dataclass
class Incoming:
    token: str
    vm: str
    verify: bool
    job_id: str
    expires: float
    definition: dict[str, Any] = field(default_factory=dict)
