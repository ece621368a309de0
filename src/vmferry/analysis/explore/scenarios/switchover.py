"""``switchover``: the point of no return under channel faults and host crashes.

A source and a destination run the real channel (:mod:`vmferry.migration.channel`: the
connection, its table, the switchover rules) over in-memory pipes.  Beside them run a
fault thread and a timer: the explorer places the fault at every step of both hosts --
between any two frames -- and the timer (which makes every deadline pass) anywhere too.

Cases, one fault each:

* ``clean``: no fault, only the timer (slow peers: every deadline fires somewhere);
* ``cut``: the connection resets (unread bytes are lost);
* ``stall``: the connection stops delivering; once the deadlines passed it delivers
  what it held, late;
* ``crash-source`` / ``crash-destination``: the host dies (its guest with it).

The check, once everyone stopped: the guest runs on exactly one live host.  It may run
nowhere only if the host that should run it crashed: the destination once the source
sent COMMIT (or the destination resumed on its own), the source before that.  Never on
two, never silently on none.

Modes (:class:`vmferry.migration.channel.Rules`): ``correct``;
``resume_after_silent_commit`` (the source resumes when COMMIT went out and no answer
came); ``resume_before_commit`` (the destination resumes once it sent LOADED).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from vmferry.analysis.explore.api import Case, Instance, Scenario
from vmferry.clock import ManualClock
from vmferry.errors import ChannelTimeout, InvariantViolation, RemoteChannelError
from vmferry.migration.channel import (
    MODES,
    NEED_DATA,
    Commit,
    Connection,
    Data,
    Error,
    ErrorKind,
    Event,
    Hello,
    Loaded,
    Resolve,
    Resumed,
    Role,
    Rules,
    Status,
    StreamEnd,
    Verdict,
    Welcome,
    decide,
)
from vmferry.migration.channel.frames import COMMAND_OF
from vmferry.migration.stream.records import Buffer
from vmferry.sync import wait_until, yield_point
from vmferry.testing.pipes import End, pipe_pair

TOKEN = "t0"
DIGESTS = {"ram": "r1", "vcpu": "v1"}
DEADLINE = 10.0  # every wait's deadline, from the start
LATE = 100.0  # what the timer thread moves the clock by
FOREVER = float("inf")


class _Crashed(Exception):
    """Unwinds a host's thread once the fault thread crashed it."""


@dataclass
class Host:
    name: str
    #: the guest runs here (the source's until it pauses at switchover)
    running: bool = False
    crashed: bool = False
    #: this host's thread has stopped
    finished: bool = False
    ends: list[End] = field(default_factory=list)


@dataclass
class World:
    rules: Rules
    clock: ManualClock = field(default_factory=ManualClock)
    src: Host = field(default_factory=lambda: Host("source", running=True))
    dst: Host = field(default_factory=lambda: Host("destination"))
    #: destination ends of resolve connections the source opened, not yet served
    dials: list[End] = field(default_factory=list)
    #: the destination's answer to RESOLVE for a token, once it settled
    ledger: dict[str, Resumed | Error] = field(default_factory=dict)
    commit_sent: bool = False
    #: the destination discarded the VM before it accepted a COMMIT
    fenced: bool = False
    #: the destination started the guest at some point
    dst_resumed: bool = False
    main_src: End = field(init=False)
    main_dst: End = field(init=False)

    def __post_init__(self) -> None:
        self.main_src, self.main_dst = pipe_pair()
        self.src.ends.append(self.main_src)
        self.dst.ends.append(self.main_dst)

    def state(self) -> Hashable:
        pipes = tuple((e.out.written, e.out.delivered, e.out.cut, e.out.closed)
                      for e in (self.main_src, self.main_dst))  # fmt: skip
        hosts = tuple((h.running, h.crashed, h.finished) for h in (self.src, self.dst))
        return (pipes, hosts, self.clock.monotonic(), len(self.dials),
                tuple(sorted((k, type(v).__name__) for k, v in self.ledger.items())),
                self.commit_sent)  # fmt: skip


# --- moving frames ------------------------------------------------------------------------


def _step(host: Host, label: str, obj: Hashable | None) -> None:
    """A yield point on ``obj``: the object itself or a stable token, never an ``id()``
    -- this frame's locals are part of the state key, and a raw address made two equal
    states differ, or match, as the allocator happened to reuse memory."""
    yield_point(f"{host.name}: {label}", obj)
    if host.crashed:
        raise _Crashed


def _send(host: Host, conn: Connection, end: End, event: Event) -> None:
    """``event`` on the wire; ConnectionResetError (the channel told) if it did not go."""
    buffers = conn.send(event)
    _step(host, f"send {COMMAND_OF[type(event)].name}", end.out)
    try:
        end.send(buffers)
    except ConnectionResetError:
        conn.send_failed()
        raise


def _recv(w: World, host: Host, conn: Connection, end: End, deadline: float) -> object:
    """The next event; ChannelTimeout (having said so to the peer) once ``deadline``
    passed; RemoteChannelError when the connection broke."""
    while True:
        ev = conn.next_event()
        if ev is not NEED_DATA:
            return ev
        wait_until(f"{host.name} reads",
                   lambda: end.readable or w.clock.monotonic() >= deadline or host.crashed)
        _step(host, "recv", end.inp)
        chunk = end.recv()
        if chunk is None:
            status = Status(ErrorKind.CHANNEL_TIMEOUT, conn.state.value, "deadline passed")
            _best_effort(end, conn.send_failure(status))
            end.close()
            raise ChannelTimeout("deadline passed", conn.state.value)
        conn.receive_data(chunk)


def _best_effort(end: End, buffers: list[Buffer]) -> None:
    if buffers:
        with contextlib.suppress(ConnectionResetError):
            end.send(buffers)


def _lost(conn: Connection, end: End) -> None:
    """The connection broke under us: the channel is in ERROR (the destination still
    tries to say it discards, in case only one direction broke)."""
    status = Status(ErrorKind.PEER, conn.state.value, "connection lost")
    _best_effort(end, conn.send_failure(status))


# --- the source ---------------------------------------------------------------------------


def _source(w: World) -> None:
    conn, end, src = Connection(Role.SOURCE), w.main_src, w.src
    try:
        try:
            _source_exchange(w, conn, end)
        except (RemoteChannelError, ChannelTimeout):
            pass
        except ConnectionResetError:
            _lost(conn, end)
        _source_settle(w, conn)
    except _Crashed:
        pass
    finally:
        src.finished = True


def _source_exchange(w: World, conn: Connection, end: End) -> None:
    src = w.src
    _send(src, conn, end, Hello(TOKEN, (1, 0), "running", "A"))
    if not isinstance(_recv(w, src, conn, end, DEADLINE), Welcome):
        return
    src.running = False  # switchover: the guest pauses, its last pages and vCPUs go out
    _send(src, conn, end, Data([b"final pages, vcpus"]))
    _send(src, conn, end, StreamEnd())
    loaded = _recv(w, src, conn, end, DEADLINE)
    if not isinstance(loaded, Loaded):
        return
    decision = decide(loaded, DIGESTS)
    _send(src, conn, end, decision)
    if isinstance(decision, Commit):
        w.commit_sent = True
        _recv(w, src, conn, end, DEADLINE)


def _source_settle(w: World, conn: Connection) -> None:
    verdict = w.rules.source_verdict(conn)
    _step(w.src, f"verdict {verdict.value}", ("host", w.src.name))
    if verdict is Verdict.RESUME:
        w.src.running = True
    elif verdict is Verdict.IN_DOUBT:
        _resolve(w)


def _resolve(w: World) -> None:
    """Ask the destination until it answers or is gone; stay paused meanwhile."""
    src = w.src
    while True:
        _step(src, "dial", "dials")
        if w.dst.crashed:
            return  # refused: the guest stays paused here, and that is all we can do
        mine, theirs = pipe_pair()
        src.ends.append(mine)
        w.dst.ends.append(theirs)
        w.dials.append(theirs)
        conn = Connection(Role.SOURCE)
        try:
            _send(src, conn, mine, Resolve(TOKEN))
            _recv(w, src, conn, mine, FOREVER)
        except (RemoteChannelError, ConnectionResetError):
            continue
        verdict = w.rules.source_verdict(conn)
        _step(src, f"resolved {verdict.value}", ("host", src.name))
        src.running = verdict is Verdict.RESUME
        return


# --- the destination ----------------------------------------------------------------------


def _destination(w: World) -> None:
    conn, end, dst = Connection(Role.DESTINATION), w.main_dst, w.dst
    try:
        try:
            _destination_exchange(w, conn, end)
        except ChannelTimeout:
            pass
        except RemoteChannelError:
            _lost(conn, end)
        except ConnectionResetError:
            _lost(conn, end)
        _destination_settle(w, conn)
        _serve_resolves(w)
    except _Crashed:
        pass
    finally:
        dst.finished = True


def _destination_exchange(w: World, conn: Connection, end: End) -> None:
    dst = w.dst
    hello = _recv(w, dst, conn, end, DEADLINE)
    if not isinstance(hello, Hello):
        return
    _send(dst, conn, end, Welcome("B"))
    while not isinstance(ev := _recv(w, dst, conn, end, DEADLINE), StreamEnd):
        if not isinstance(ev, Data):
            return  # ABORT
    _send(dst, conn, end, Loaded({"digests": DIGESTS}))
    if w.rules.destination_may_resume(conn):
        _resume_here(w)
    if isinstance(_recv(w, dst, conn, end, DEADLINE), Commit):
        _resume_here(w)
        _send(dst, conn, end, Resumed({"post_load": {}}))


def _resume_here(w: World) -> None:
    _step(w.dst, "resume guest", ("host", w.dst.name))
    w.dst.running = w.dst_resumed = True


def _destination_settle(w: World, conn: Connection) -> None:
    """Record what a later RESOLVE hears: resumed, or discarded for good."""
    dst = w.dst
    _step(dst, "settle", "ledger")
    if conn.committed or dst.running:
        dst.running = True
        w.ledger[TOKEN] = Resumed({"post_load": {}})
    else:
        w.fenced = True
        w.ledger[TOKEN] = Error(Status(ErrorKind.MIGRATION, conn.state.value,
                                       "the destination discarded the VM"))  # fmt: skip


def _serve_resolves(w: World) -> None:
    dst = w.dst
    while True:
        wait_until("destination awaits RESOLVE",
                   lambda: bool(w.dials) or w.src.finished or dst.crashed)
        _step(dst, "accept", "dials")
        if not w.dials:
            return
        end = w.dials.pop(0)
        conn = Connection(Role.DESTINATION)
        try:
            ev = _recv(w, dst, conn, end, FOREVER)
            answer: Event = w.ledger[ev.token] if isinstance(ev, Resolve) else Error(
                Status(ErrorKind.PEER, "resolve", "expected RESOLVE"))
            _send(dst, conn, end, answer)
        except (RemoteChannelError, ConnectionResetError):
            continue


# --- faults -------------------------------------------------------------------------------


def _crash(w: World, host: Host) -> Callable[[], None]:
    def run() -> None:
        yield_point(f"crash {host.name}", None)
        host.crashed, host.running = True, False
        for end in host.ends:
            end.cut(lose_in_flight=False)

    return run


def _cut(w: World) -> None:
    yield_point("cut the connection", None)
    w.main_src.cut()


def _stall(w: World) -> None:
    yield_point("stall the connection", None)
    for pipe in (w.main_src.out, w.main_dst.out):
        pipe.stall_now()
    wait_until("stall until the deadlines passed", lambda: w.clock.monotonic() >= LATE)
    yield_point("deliver late", None)
    for pipe in (w.main_src.out, w.main_dst.out):
        pipe.release()


def _timer(w: World) -> None:
    yield_point("every deadline passes", "clock")
    w.clock.advance(LATE)


# --- the check ----------------------------------------------------------------------------


def _check(w: World) -> None:
    live = [h.name for h in (w.src, w.dst) if h.running and not h.crashed]
    if len(live) > 1:
        raise InvariantViolation("the guest runs on both hosts")
    if live:
        return
    should = w.dst if (w.commit_sent and not w.fenced) or w.dst_resumed else w.src
    if not should.crashed:
        raise InvariantViolation(f"the guest runs nowhere, though the {should.name} that "
                                 "should run it is up")  # fmt: skip


def _builder(fault: str) -> Callable[[str], Instance]:
    def build(mode: str) -> Instance:
        w = World(Rules(mode))
        threads: dict[str, Callable[[], None]] = {
            "source": lambda: _source(w),
            "destination": lambda: _destination(w),
            "timer": lambda: _timer(w),
        }
        if fault == "cut":
            threads["net"] = lambda: _cut(w)
        elif fault == "stall":
            threads["net"] = lambda: _stall(w)
        elif fault == "crash-source":
            threads["crash"] = _crash(w, w.src)
        elif fault == "crash-destination":
            threads["crash"] = _crash(w, w.dst)
        return Instance(threads, check=lambda: _check(w), state=w.state)

    return build


_FAULTY = frozenset(MODES) - {"correct"}
SCENARIO = Scenario(
    name="switchover",
    description="the migration channel's point of no return under cuts, stalls and crashes",
    modes=MODES,
    default_mode="correct",
    cases=(
        Case("clean", "no fault; every deadline may pass at any step", _builder("clean"),
             fails_in=_FAULTY),
        Case("cut", "the connection resets between any two frames", _builder("cut"),
             fails_in=_FAULTY),
        Case("stall", "the connection stalls, then delivers late", _builder("stall"),
             fails_in=_FAULTY),
        Case("crash-source", "the source host dies at any step", _builder("crash-source")),
        Case("crash-destination", "the destination host dies at any step",
             _builder("crash-destination")),
    ),
    mode_help={
        "correct": "the source resumes only on a definite no; the destination only on COMMIT",
        "resume_after_silent_commit": "the source resumes when COMMIT got no answer",
        "resume_before_commit": "the destination resumes as soon as it sent LOADED",
    },
    preemption_bound=1,
    max_steps=400,
)
