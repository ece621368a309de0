"""The channel connection driven in memory: the whole exchange, every split, every
illegal move, every cut."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import (
    ChecksumMismatch,
    LocalChannelError,
    MigrationCancelled,
    RemoteChannelError,
)
from vmferry.migration.channel import (
    NEED_DATA,
    TERMINAL,
    TRANSITIONS,
    Abort,
    Closed,
    Commit,
    Connection,
    Data,
    Error,
    ErrorKind,
    Event,
    Hello,
    Loaded,
    Reject,
    Resolve,
    Resumed,
    Role,
    State,
    Status,
    StreamEnd,
    Welcome,
)
from vmferry.testing.pipes import End, Faults, pipe_pair

HELLO = Hello("tok", (1, 0), "running", "A")
STREAM = [b"x" * 1000, b"y" * 5000, b"z"]


def pump(conn: Connection, end: End) -> list[object]:
    """Feed every due byte into ``conn``; the events it yields (Data chunks joined)."""
    out: list[object] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            chunk = end.recv()
            if chunk is None:
                return out
            conn.receive_data(chunk)
            continue
        out.append(ev)
        if isinstance(ev, Closed):
            return out


def run_exchange(a_to_b: Faults | None = None, b_to_a: Faults | None = None) -> tuple[
    Connection, Connection, list[object]]:
    """A full migration exchange; returns both connections and what the destination saw."""
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    a, b = pipe_pair(a_to_b, b_to_a)
    seen: list[object] = []
    a.send(src.send(HELLO))
    seen += pump(dst, b)
    b.send(dst.send(Welcome("B")))
    assert pump(src, a) == [Welcome("B")]
    for piece in STREAM:
        a.send(src.send(Data([piece])))
    a.send(src.send(StreamEnd()))
    seen += pump(dst, b)
    b.send(dst.send(Loaded({"pages": 3})))
    assert pump(src, a) == [Loaded({"pages": 3})]
    a.send(src.send(Commit()))
    seen += pump(dst, b)
    b.send(dst.send(Resumed({"resume_ms": 1.0})))
    assert pump(src, a) == [Resumed({"resume_ms": 1.0})]
    a.close()
    b.close()
    seen += pump(dst, b)
    assert pump(src, a) == [Closed()]
    return src, dst, seen


def payload(seen: list[object]) -> bytes:
    return b"".join(bytes(p) for ev in seen if isinstance(ev, Data) for p in ev.payload)


def test_the_whole_exchange_ends_done_on_both_sides() -> None:
    src, dst, seen = run_exchange()
    assert src.state is dst.state is State.DONE
    assert src.committed and dst.committed
    assert seen[0] == HELLO and seen[-3:] == [StreamEnd(), Commit(), Closed()]
    assert payload(seen) == b"".join(STREAM)


@settings(max_examples=60, deadline=None)
@given(trickle=st.one_of(st.none(), st.integers(1, 40)),
       splits=st.frozensets(st.integers(1, 6200), max_size=8))  # fmt: skip
def test_any_split_or_trickle_yields_the_same_events(trickle: int | None,
                                                     splits: frozenset[int]) -> None:
    faults = Faults(trickle=trickle, split_at=splits)
    _, dst, seen = run_exchange(faults, faults)
    assert dst.state is State.DONE
    assert payload(seen) == b"".join(STREAM)
    assert [e for e in seen if not isinstance(e, Data)] == [
        HELLO, StreamEnd(), Commit(), Closed()]


def test_direct_payload_reads_straight_into_the_sink() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    wire = b"".join(bytes(b) for b in src.send(HELLO))
    dst.receive_data(wire)
    assert dst.next_event() == HELLO
    src.receive_data(b"".join(bytes(b) for b in dst.send(Welcome("B"))))
    assert src.next_event() == Welcome("B")
    header, body = src.send(Data([b"0123456789"]))
    dst.receive_data(header)
    assert dst.next_event() is NEED_DATA and dst.direct_payload() == 10
    dst.direct_payload_done(4)  # "recv_into" our sink took 4 bytes
    assert dst.direct_payload() == 6
    dst.receive_data(bytes(body)[4:])
    assert dst.direct_payload() == 0  # bytes are buffered: they come as events
    ev = dst.next_event()
    assert isinstance(ev, Data) and bytes(ev.payload[0]) == b"456789"
    with pytest.raises(LocalChannelError):
        dst.direct_payload_done(1)
    assert dst.state is State.ERROR and dst.failed_in is State.STREAMING


@pytest.mark.parametrize("role", list(Role))
def test_every_illegal_send_is_a_local_error_naming_the_state(role: Role) -> None:
    samples: list[Event] = [HELLO, Welcome("B"), Data([b"a"]), StreamEnd(), Loaded({}),
                            Commit(), Resumed({}), Resolve("t"),
                            Abort(Status(ErrorKind.CANCELLED, "s", "m")),
                            Error(Status(ErrorKind.MIGRATION, "s", "m"))]  # fmt: skip
    from vmferry.migration.channel.frames import COMMAND_OF
    from vmferry.migration.channel.table import Dir

    for state, row in TRANSITIONS[role].items():
        for ev in samples:
            conn = Connection(role)
            conn.state = state
            if (Dir.SEND, COMMAND_OF[type(ev)]) in row:
                conn.send(ev)
                assert conn.state is row[(Dir.SEND, COMMAND_OF[type(ev)])]
                continue
            with pytest.raises(LocalChannelError) as info:
                conn.send(ev)
            assert info.value.step == state.value
            assert conn.state is State.ERROR
            assert conn.failed_in is (None if state is State.ERROR else state)


def test_terminal_states_have_empty_rows() -> None:
    for role in Role:
        for state in TERMINAL:
            assert TRANSITIONS[role][state] == {}


def test_an_illegal_frame_from_the_peer_is_a_remote_error() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    src.state = State.DECIDING
    wire = src.send(Commit())
    dst.receive_data(b"".join(bytes(b) for b in wire))  # COMMIT before HELLO
    with pytest.raises(RemoteChannelError, match="idle cannot receive COMMIT"):
        dst.next_event()
    assert dst.state is State.ERROR and dst.failed_in is State.IDLE
    with pytest.raises(LocalChannelError):
        dst.next_event()
    with pytest.raises(LocalChannelError):
        dst.send(Welcome("B"))


def test_a_damaged_commit_is_refused_and_the_destination_may_say_why() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    src.state, dst.state = State.DECIDING, State.DECIDING
    header, _ = (bytes(b) for b in src.send(Commit()))
    dst.receive_data(header + b"{]")  # same length, other bytes
    with pytest.raises(RemoteChannelError, match="damaged COMMIT"):
        dst.next_event()
    assert not dst.committed and dst.state is State.ERROR
    last = dst.send_failure(Status(ErrorKind.REMOTE_CHANNEL, "deciding", "damaged COMMIT"))
    src.receive_data(b"".join(bytes(b) for b in last))
    ev = src.next_event()
    assert isinstance(ev, Error) and src.state is State.ABORTED
    assert isinstance(ev.status.exception(), RemoteChannelError)


@pytest.mark.parametrize("state", [State.HANDSHAKE, State.STREAMING, State.LOADING,
                                   State.DECIDING, State.COMMITTING])  # fmt: skip
def test_end_of_file_mid_exchange_is_a_remote_error(state: State) -> None:
    src = Connection(Role.SOURCE)
    src.state = state
    src.committed = state is State.COMMITTING
    src.receive_data(b"")
    with pytest.raises(RemoteChannelError, match=f"closed the connection in state {state.value}"):
        src.next_event()
    assert src.failed_in is state
    assert src.in_doubt is (state is State.COMMITTING)


@pytest.mark.parametrize("cut", range(0, 12 + 40, 3))
def test_a_cut_at_any_offset_of_hello_is_a_clean_remote_error(cut: int) -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    a, b = pipe_pair(Faults(cut_at=cut))
    with contextlib.suppress(ConnectionResetError):
        a.send(src.send(HELLO))
    with pytest.raises(RemoteChannelError):
        pump(dst, b)
    assert dst.state is State.ERROR


def test_errors_cross_as_the_same_class() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    src.state, dst.state = State.STREAMING, State.STREAMING
    bad = ChecksumMismatch("record 7 checksum", 4096)
    src.receive_data(b"".join(bytes(x) for x in dst.send(
        Error(Status.from_exception(bad, "receiving stream")))))  # fmt: skip
    ev = src.next_event()
    assert isinstance(ev, Error)
    exc = ev.status.exception()
    assert type(exc) is ChecksumMismatch and str(exc) == str(bad)
    assert ev.status.step == "receiving stream"


def test_frames_in_flight_after_abort_are_dropped() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    src.state, dst.state = State.LOADING, State.LOADING
    abort = src.send(Abort(Status(ErrorKind.CANCELLED, "loading", "operator")))
    loaded = dst.send(Loaded({}))  # crosses the ABORT
    src.receive_data(b"".join(bytes(x) for x in loaded))
    dst.receive_data(b"".join(bytes(x) for x in abort))
    assert src.next_event() is NEED_DATA and src.state is State.ABORTED
    ev = dst.next_event()
    assert isinstance(ev, Abort) and isinstance(ev.status.exception(), MigrationCancelled)
    assert dst.state is State.ABORTED


def test_issue14_1_destination_refuses_before_welcome_with_reject() -> None:
    """A destination that fails before it said WELCOME (a bad HELLO, a wrong version)
    answers REJECT, which a source in HANDSHAKE can read: a typed refusal."""
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    hello = b"".join(bytes(b) for b in src.send(Hello("t", (1, 0), "running", "A", major=7,
                                                         minor=1)))
    dst.receive_data(hello)
    with pytest.raises(RemoteChannelError, match=r"channel protocol 7\.1 is not supported"):
        dst.next_event()
    status = Status(ErrorKind.REFUSED, "handshake", "channel protocol 7.1 is not supported")
    src.receive_data(b"".join(bytes(b) for b in dst.send_failure(status)))
    ev = src.next_event()
    assert ev.__class__.__name__ == "Reject" and src.state is State.ABORTED
    assert isinstance(ev, Reject) and ev.status == status


def test_issue14_1_peer_failure_reads_the_error_after_this_side_failed() -> None:
    """The source's write failed (the destination closed after its ERROR): the ERROR
    is still read, past DATA, without the table judging it."""
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    dst.receive_data(b"".join(bytes(b) for b in src.send(HELLO)))
    dst.next_event()
    wire = b"".join(bytes(b) for b in dst.send(Welcome("B")))
    src.receive_data(wire)
    assert isinstance(src.next_event(), Welcome)
    src.send(Data([b"abc"]))
    status = Status(ErrorKind.CHECKSUM_MISMATCH, "receiving stream", "bad record")
    err = b"".join(bytes(b) for b in dst.send_failure(status))
    src.send_failed()
    assert src.state is State.ERROR
    src.receive_data(err[:5])
    assert src.peer_failure() is None  # only part of it so far
    src.receive_data(err[5:])
    got = src.peer_failure()
    assert got == status and isinstance(got.exception(), ChecksumMismatch)
    assert src.state is State.ERROR


def test_issue14_1_legacy_json_frames_are_named() -> None:
    dst = Connection(Role.DESTINATION)
    dst.receive_data(b"\0\0\0\x10" + b'{"type":"hello"}')
    with pytest.raises(RemoteChannelError, match="earlier JSON control frames"):
        dst.next_event()
