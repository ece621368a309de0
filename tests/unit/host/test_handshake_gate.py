"""The migration listener's handshake gate (issue 10, Why 15): an overall deadline for the
HELLO however slowly it trickles, no thread per waiting connection, a cap on waiting."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmferry.host.transport import serve_handshakes


class Gate:
    def __init__(self, deadline_s: float, max_pending: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.hellos: list[dict[str, Any]] = []
        self.refusals: list[str] = []
        self.changed = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=serve_handshakes, args=(
            self.listener, lambda: self.stop, self._hello, self._refuse, deadline_s,
            max_pending), daemon=True)
        self.thread.start()

    def _hello(self, conn: socket.socket, addr: Any, hello: dict[str, Any]) -> None:
        with self.changed:
            self.hellos.append(hello)
            self.changed.notify_all()
        conn.close()

    def _refuse(self, conn: socket.socket, addr: Any, reason: str) -> None:
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


def frame(msg: Any) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">I", len(body)) + body


def test_issue10_15_trickled_hello_hits_the_overall_deadline(gate: Gate) -> None:
    data = frame({"type": "hello", "token": "x" * 200})
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
        good.sendall(frame({"type": "hello", "token": "t"}))
        good.close()
        assert len(gate.wait("refusals", 3)) >= 3  # both idle ones time out
    finally:
        for s in [*idle, extra]:
            s.close()


@pytest.mark.parametrize("data", [
    struct.pack(">I", 10**6) + b"{}",
    frame([1, 2]),
    frame({"no": "type"}),
    struct.pack(">I", 3) + b"\xff\xfe\xfd",
    frame({"type": "hello"}) + b"extra",
])
def test_bad_hellos_are_refused_with_a_reason(gate: Gate, data: bytes) -> None:
    with socket.create_connection(gate.address) as sock:
        sock.sendall(data)
        reasons = gate.wait("refusals", 1)
    assert reasons[0] and gate.hellos == []


def test_a_complete_hello_is_handed_over(gate: Gate) -> None:
    with socket.create_connection(gate.address) as sock:
        sock.sendall(frame({"type": "hello", "token": "abc"}))
        hellos = gate.wait("hellos", 1)
    assert hellos[0] == {"type": "hello", "token": "abc"}
