"""VM runstates and job statuses: one enum each, one transition table each.

Theory of operation
-------------------
A hosted VM's runstate and a job's status change in one place each:
:meth:`vmferry.host.records.HostedVm.move` and :meth:`vmferry.host.records.Job.move`,
which look the move up in :data:`RUNSTATE_MOVES` / :data:`JOB_MOVES` and raise
:class:`~vmferry.errors.HostError` naming both states for a move the table lacks.  Staying
in the same state is always allowed (a job persisted twice at one step).

Both enums are ``StrEnum``: a value is the string the store, the control API and the
events have always carried (``"needs-attention"``, ``"device"``), so persisted rows and
JSON load by that string (``Runstate("running")``) and compare equal to it.

Runstates::

    running <-> paused             vm start / vm pause
    running|paused -> migrating    a source job owns the VM
    migrating -> running|paused    the migration failed before COMMIT (as it was)
    migrating -> migrated          it runs on the destination; this is the husk
    migrating -> needs-attention   COMMIT went out and nobody can tell the outcome
    needs-attention -> paused      the operator's word: it runs nowhere else
    running|paused -> saving -> running|paused
    running|paused|migrating -> recovering
                                   a restarted daemon rebuilds it in the background
    recovering -> paused|migrated|needs-attention|failed
                                   rebuilt (memory lost), or its migration settled
    running|paused|migrating|recovering|needs-attention -> failed
                                   a restarted daemon could not rebuild it

Job statuses (QEMU's names)::

    setup -> active -> device -> completed      (offline: setup -> device)
    setup|active|device -> failed | cancelled
    setup|active -> completed                    (a destination resumes from active)
"""

from __future__ import annotations

import enum
from typing import TypeVar

from vmferry.errors import HostError


class Runstate(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"
    MIGRATED = "migrated"
    NEEDS_ATTENTION = "needs-attention"
    SAVING = "saving"
    #: never persisted: a restarted daemon is rebuilding it (the store keeps the old one)
    RECOVERING = "recovering"
    FAILED = "failed"


R = Runstate

RUNSTATE_MOVES: dict[Runstate, frozenset[Runstate]] = {
    R.RUNNING: frozenset({R.PAUSED, R.MIGRATING, R.SAVING, R.RECOVERING, R.FAILED}),
    R.PAUSED: frozenset({R.RUNNING, R.MIGRATING, R.SAVING, R.RECOVERING, R.FAILED}),
    R.MIGRATING: frozenset({R.RUNNING, R.PAUSED, R.MIGRATED, R.NEEDS_ATTENTION, R.RECOVERING,
                            R.FAILED}),
    R.RECOVERING: frozenset({R.PAUSED, R.MIGRATED, R.NEEDS_ATTENTION, R.FAILED}),
    R.MIGRATED: frozenset(),
    R.NEEDS_ATTENTION: frozenset({R.PAUSED, R.FAILED}),
    R.SAVING: frozenset({R.RUNNING, R.PAUSED}),
    R.FAILED: frozenset(),
}


class JobStatus(enum.StrEnum):
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return not JOB_MOVES[self]


J = JobStatus

JOB_MOVES: dict[JobStatus, frozenset[JobStatus]] = {
    J.SETUP: frozenset({J.ACTIVE, J.DEVICE, J.COMPLETED, J.FAILED, J.CANCELLED}),
    J.ACTIVE: frozenset({J.DEVICE, J.COMPLETED, J.FAILED, J.CANCELLED}),
    J.DEVICE: frozenset({J.COMPLETED, J.FAILED, J.CANCELLED}),
    J.COMPLETED: frozenset(),
    J.FAILED: frozenset(),
    J.CANCELLED: frozenset(),
}

#: job statuses in which the job still runs
UNFINISHED = frozenset(s for s in JobStatus if not s.finished)


S = TypeVar("S", Runstate, JobStatus)


def check_move(table: dict[S, frozenset[S]], what: str, current: S, to: S) -> S:
    """``to`` if the table allows ``current -> to`` (or they are equal); HostError naming
    both otherwise."""
    if to is not current and to not in table[current]:
        raise HostError(f"{what}: {current.value} -> {to.value} is not a legal move")
    return to
