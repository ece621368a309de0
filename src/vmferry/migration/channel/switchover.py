"""The rules at the point of no return, shared by the host daemon and the explorer.

Theory of operation
-------------------
The guest must end up running on exactly one host.  The channel gives each side what it
knows; these functions say what each side may then do:

* the **source** decides: after LOADED it compares what the destination loaded with
  what it sent (:func:`decide`) and sends COMMIT or ABORT.  Before COMMIT it may always
  take its guest back.  After COMMIT it resumes only on a definite "no" -- an ERROR from
  the destination, which promises the destination discarded the VM and never runs it.
  A broken connection or a deadline after COMMIT leaves it *in doubt*: it keeps the
  guest paused and asks again over a new connection (RESOLVE) until the destination
  answers or is gone (:func:`source_verdict`);
* the **destination** resumes only once it received COMMIT
  (:func:`destination_may_resume`).  Any other end -- ABORT, a deadline, a broken
  connection, a damaged frame -- discards the VM, and it answers a later RESOLVE with
  ERROR.  A RESOLVE that finds the VM still staged is as good as COMMIT: only a source
  that sent COMMIT sends RESOLVE.

:class:`Rules` also carries the two classic mistakes as faulty modes, so the
``switchover`` explorer scenario can show what they cost:

* ``resume_after_silent_commit``: the source resumes when COMMIT went out and no answer
  came (the guest may run twice);
* ``resume_before_commit``: the destination resumes as soon as it sent LOADED (the guest
  may run twice, or nowhere after the source gives up).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmferry.errors import LocalChannelError
from vmferry.migration.channel.connection import Connection
from vmferry.migration.channel.frames import Abort, Commit, Loaded
from vmferry.migration.channel.status import ErrorKind, Status
from vmferry.migration.channel.table import Role, State

MODES = ("correct", "resume_after_silent_commit", "resume_before_commit")


class Verdict(enum.Enum):
    #: the destination runs the guest: the source releases its copy
    MIGRATED = "migrated"
    #: the destination never will: the source resumes its guest
    RESUME = "resume"
    #: COMMIT went out and nothing settled it: stay paused, RESOLVE
    IN_DOUBT = "in-doubt"


@dataclass(frozen=True)
class Rules:
    mode: str = "correct"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LocalChannelError(f"unknown switchover mode {self.mode!r}; one of {MODES}")

    def source_verdict(self, conn: Connection) -> Verdict:
        """What the source does once its channel ended (DONE, ABORTED or ERROR)."""
        if conn.role is not Role.SOURCE:
            raise LocalChannelError("source_verdict() of a destination connection")
        if conn.state is State.DONE:
            return Verdict.MIGRATED
        if conn.state is State.ABORTED:
            return Verdict.RESUME
        if conn.state is State.ERROR:
            if conn.committed and self.mode != "resume_after_silent_commit":
                return Verdict.IN_DOUBT
            return Verdict.RESUME
        raise LocalChannelError(f"source_verdict() while the exchange goes on "
                                f"(state {conn.state.value})", conn.state.value)  # fmt: skip

    def destination_may_resume(self, conn: Connection) -> bool:
        """Whether the destination may start the guest now."""
        if conn.role is not Role.DESTINATION:
            raise LocalChannelError("destination_may_resume() of a source connection")
        if self.mode == "resume_before_commit" and conn.state is State.DECIDING:
            return True
        return conn.committed and conn.state is State.COMMITTING


def decide(loaded: Loaded, sent: Mapping[str, Any] | None) -> Commit | Abort:
    """COMMIT, or ABORT naming the difference when the source asked for verification
    (``sent``: its digests of what it sent) and the destination loaded something else."""
    if sent is None:
        return Commit()
    got = loaded.ack.get("digests")
    if not isinstance(got, Mapping) or not got:
        return Abort(Status(ErrorKind.MIGRATION, "verification",
                            "the destination sent no digests to verify"))  # fmt: skip
    differ = sorted(k for k in set(sent) | set(got) if sent.get(k) != got.get(k))
    if differ:
        return Abort(Status(ErrorKind.MIGRATION, "verification",
                            f"the destination loaded different {', '.join(differ)}"))  # fmt: skip
    return Commit()
