"""The rules at the point of no return."""

from __future__ import annotations

import pytest

from vmferry.errors import LocalChannelError
from vmferry.migration.channel import (
    Abort,
    Commit,
    Connection,
    ErrorKind,
    Loaded,
    Role,
    Rules,
    State,
    Status,
    Verdict,
    decide,
)

STATUS = Status(ErrorKind.PEER, "x", "connection lost")


def source_in(state: State, committed: bool = False) -> Connection:
    conn = Connection(Role.SOURCE)
    conn.state, conn.committed = state, committed
    return conn


def test_source_verdicts() -> None:
    rules = Rules()
    assert rules.source_verdict(source_in(State.DONE, True)) is Verdict.MIGRATED
    assert rules.source_verdict(source_in(State.ABORTED, True)) is Verdict.RESUME
    assert rules.source_verdict(source_in(State.ERROR)) is Verdict.RESUME
    assert rules.source_verdict(source_in(State.ERROR, True)) is Verdict.IN_DOUBT
    assert Rules("resume_after_silent_commit").source_verdict(
        source_in(State.ERROR, True)) is Verdict.RESUME
    with pytest.raises(LocalChannelError, match="goes on"):
        rules.source_verdict(source_in(State.COMMITTING, True))


def test_a_source_past_commit_says_nothing_when_it_gives_up() -> None:
    conn = source_in(State.DECIDING)
    conn.send(Commit())
    assert conn.send_failure(STATUS) == []
    assert conn.state is State.ERROR and conn.in_doubt


def test_a_commit_that_never_left_is_no_commit() -> None:
    conn = source_in(State.DECIDING)
    conn.send(Commit())
    conn.send_failed()  # the write raised
    assert not conn.committed and conn.state is State.ERROR
    assert Rules().source_verdict(conn) is Verdict.RESUME


def test_a_destination_that_did_not_commit_still_fences_after_an_error() -> None:
    dst = Connection(Role.DESTINATION)
    dst.state, dst.failed_in = State.ERROR, State.DECIDING
    assert dst.send_failure(STATUS)  # its ERROR frame still goes out
    dst.committed = True
    assert dst.send_failure(STATUS) == []


def test_the_destination_resumes_only_after_commit() -> None:
    dst = Connection(Role.DESTINATION)
    dst.state = State.DECIDING
    assert not Rules().destination_may_resume(dst)
    assert Rules("resume_before_commit").destination_may_resume(dst)
    dst.state, dst.committed = State.COMMITTING, True
    assert Rules().destination_may_resume(dst)


def test_decide_compares_digests_before_commit() -> None:
    sent = {"ram": "a", "vcpu": "b"}
    assert decide(Loaded({"digests": sent}), sent) == Commit()
    assert decide(Loaded({}), None) == Commit()
    bad = decide(Loaded({"digests": {"ram": "a", "vcpu": "c"}}), sent)
    assert isinstance(bad, Abort) and "vcpu" in bad.status.message
    assert bad.status.step == "verification"
    assert isinstance(decide(Loaded({}), sent), Abort)
    with pytest.raises(LocalChannelError):
        Rules("sometimes")


def test_docs_tables_and_diagrams_are_the_transition_table() -> None:
    from pathlib import Path

    from vmferry.migration.channel import mermaid
    from vmferry.migration.channel.table import markdown_table

    doc = (Path(__file__).resolve().parents[4] / "docs" / "channel.md").read_text()
    for role in Role:
        assert markdown_table(role) in doc
        assert mermaid(role) in doc
