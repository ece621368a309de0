"""The migration listener's handshake gate (issue 10, Why 15): an overall deadline for the
HELLO however slowly it trickles, no thread per waiting connection, a cap on waiting.  It
reads each connection's first frame into a channel Connection (issue 14, item 1)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmferry.host.transport import serve_handshakes
from vmferry.migration.channel import Abort, Connection, ErrorKind, Hello, Role, Status
from vmferry.migration.channel.frames import HEADER, Command


class Gate:
    def __init__(self, deadline_s: float, max_pending: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.hellos: list[Hello | Abort] = []
        self.refusals: list[str] = []
        self.changed = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=serve_handshakes, args=(
            self.listener, lambda: self.stop, self._hello, self._refuse, deadline_s,
            max_pending), daemon=True)
        self.thread.start()

    def _hello(self, conn: socket.socket, addr: Any, channel: Connection,
               hello: Hello | Abort) -> None:
        with self.changed:
            self.hellos.append(hello)
            self.changed.notify_all()
        conn.close()

    def _refuse(self, conn: socket.socket, addr: Any, reason: str,
                channel: Connection | None) -> None:
        with self.changed:
            self.refusals.append(reason)
            self.changed.notify_all()
        conn.close()

    def wait(self, what: str, n: int) -> list[Any]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(getattr(self, what)) >= n, timeout=10)
            out: list[Any] = getattr(self, what)
            return out


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate(deadline_s=0.5, max_pending=2)
    yield g
    g.stop = True
    g.listener.close()
    g.thread.join(5)


def frame(event: Hello | Abort) -> bytes:
    return b"".join(bytes(b) for b in Connection(Role.SOURCE).send(event))


def hello(token: str = "t") -> Hello:
    return Hello(token, (1, 0), "running", "A")


def test_issue10_15_trickled_hello_hits_the_overall_deadline(gate: Gate) -> None:
    data = frame(hello("x" * 200))
    with socket.create_connection(gate.address) as sock:
        for i in range(len(data) - 1):  # never the last byte
            try:
                sock.send(data[i:i + 1])
            except OSError:
                break
            if gate.refusals:
                break
            time.sleep(0.02)
        reasons = gate.wait("refusals", 1)
    assert "no complete hello within 0.5 s" in reasons[0]
    assert gate.hellos == []


def test_issue10_15_waiting_connections_cost_no_thread_and_are_capped(gate: Gate) -> None:
    before = threading.active_count()
    idle = [socket.create_connection(gate.address) for _ in range(2)]
    extra = socket.create_connection(gate.address)
    try:
        reasons = gate.wait("refusals", 1)
        assert "already wait" in reasons[0]
        assert threading.active_count() == before
        good = socket.create_connection(gate.address)
        good.sendall(frame(hello()))
        good.close()
        assert len(gate.wait("refusals", 3)) >= 3  # both idle ones time out
    finally:
        for s in [*idle, extra]:
            s.close()


@pytest.mark.parametrize(("data", "words"), [
    (HEADER.pack(Command.HELLO, 0, 10**6, 0) + b"{}", "over the"),
    (HEADER.pack(99, 0, 2, 0) + b"{}", "unknown channel command"),
    (frame(hello())[:-1] + b"!", "CRC"),
    (HEADER.pack(Command.DATA, 0, 3, 0) + b"abc", "cannot receive DATA"),
    (frame(hello()) + HEADER.pack(Command.DATA, 0, 3, 0) + b"abc", "before the welcome"),
    (b"\0\0\0\x10" + b'{"type": "hello"}', "earlier JSON control frames"),
    (b"\x16\x03\x01\x00\x10" + b"x" * 16, "speaks TLS"),
])
def test_bad_first_frames_are_refused_with_a_reason(gate: Gate, data: bytes,
                                                    words: str) -> None:
    with socket.create_connection(gate.address) as sock:
        sock.sendall(data)
        reasons = gate.wait("refusals", 1)
    assert words in reasons[0] and gate.hellos == []


def test_a_complete_hello_is_handed_over(gate: Gate) -> None:
    with socket.create_connection(gate.address) as sock:
        sock.sendall(frame(hello("abc")))
        hellos = gate.wait("hellos", 1)
    assert hellos[0] == hello("abc")


def test_issue14_1_a_preflight_abort_with_its_token_is_handed_over(gate: Gate) -> None:
    abort = Abort(Status(ErrorKind.REFUSED, "pre-flight", "no"), token="abc")
    with socket.create_connection(gate.address) as sock:
        sock.sendall(frame(abort))
        first = gate.wait("hellos", 1)
    assert first[0] == abort
