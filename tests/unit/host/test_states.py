"""Issue 14 item 4: VM runstates and job statuses are enums with one transition table
each, and one writer each that refuses a move the table lacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.errors import HostError
from vmferry.host.daemon import HostDaemon
from vmferry.host.records import HostedVm, Job
from vmferry.host.states import JOB_MOVES, RUNSTATE_MOVES, JobStatus, Runstate
from vmferry.host.store import JobRow, Store


def test_issue14_4_every_state_has_a_row_and_terminal_states_have_no_moves() -> None:
    assert set(RUNSTATE_MOVES) == set(Runstate)
    assert set(JOB_MOVES) == set(JobStatus)
    assert {s for s in JobStatus if s.finished} == {
        JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    assert RUNSTATE_MOVES[Runstate.MIGRATED] == frozenset()  # a husk never runs again


@pytest.mark.parametrize("start", list(Runstate))
@pytest.mark.parametrize("to", list(Runstate))
def test_issue14_4_runstate_moves_follow_the_table(start: Runstate, to: Runstate) -> None:
    vm = HostedVm("g", {}, start)
    if to is start or to in RUNSTATE_MOVES[start]:
        assert vm.move(to) is start and vm.runstate is to
    else:
        with pytest.raises(HostError, match=f"{start.value} -> {to.value}"):
            vm.move(to)
        assert vm.runstate is start  # a refused move changes nothing


@pytest.mark.parametrize("start", list(JobStatus))
@pytest.mark.parametrize("to", list(JobStatus))
def test_issue14_4_job_moves_follow_the_table(start: JobStatus, to: JobStatus) -> None:
    job = Job("j", "g", "source", "p", {}, start)
    if to is start or to in JOB_MOVES[start]:
        job.move(to, "step", "why")
        assert job.status is to and job.step == "step" and job.error == "why"
    else:
        with pytest.raises(HostError, match="is not a legal move"):
            job.move(to, "step", "why")
        assert job.status is start and job.step == ""


def test_issue14_4_the_move_is_the_only_writer() -> None:
    vm, job = HostedVm("g", {}, "running"), Job("j", "g", "source", "p", {})
    with pytest.raises(AttributeError):
        vm.runstate = Runstate.PAUSED  # type: ignore[misc]
    with pytest.raises(AttributeError):
        job.status = JobStatus.FAILED  # type: ignore[misc]


def test_issue14_4_persisted_strings_load_as_enums(tmp_path: Path) -> None:
    """Rows written as plain strings (by this release or an earlier one) load by their
    string and compare equal to it; what is written back is the same string."""
    (tmp_path / "R").mkdir()
    store = Store(tmp_path / "R" / "host.sqlite3")
    store.put_vm("g", {"name": "g", "memory_mib": 4}, "migrated")
    store.put_job(JobRow("j1", "g", "source", "http://127.0.0.1:9", "completed", {}, {}, "",
                         "completed", 1.0, 1.0, {}))
    store.close()
    d = HostDaemon("R", tmp_path / "R")
    d.recover()
    try:
        assert d.vms["g"].runstate is Runstate.MIGRATED and d.vms["g"].runstate == "migrated"
        assert d.jobs["j1"].status is JobStatus.COMPLETED
        assert d.job_json(d.jobs["j1"])["status"] == "completed"
        assert d.vms["g"].to_json()["runstate"] == "migrated"
        assert d.store.vms()[0][2] == "migrated"
    finally:
        d.shutdown()
