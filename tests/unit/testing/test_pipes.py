"""The misbehaving in-memory pipes."""

from __future__ import annotations

import pytest

from vmferry.testing.pipes import Faults, Pipe, pipe_pair


def drain(p: Pipe) -> list[bytes]:
    out = []
    while (chunk := p.read()) not in (None, b""):
        assert chunk is not None
        out.append(chunk)
    return out


def test_trickle_and_split() -> None:
    p = Pipe(Faults(trickle=3, split_at=frozenset({4})))
    p.write(b"abcdefgh")
    assert drain(p) == [b"abc", b"d", b"efg", b"h"]
    assert p.read() is None
    p.close()
    assert p.read() == b""


def test_stall_holds_bytes_until_released() -> None:
    p = Pipe(Faults(stall_at=2))
    p.write([b"ab", b"cd"])
    assert drain(p) == [b"ab"] and not p.readable
    p.release()
    assert drain(p) == [b"cd"]


def test_cut_delivers_up_to_the_offset_then_eof_and_fails_the_writer() -> None:
    p = Pipe(Faults(cut_at=3))
    with pytest.raises(ConnectionResetError):
        p.write(b"abcdef")
    assert drain(p) == [b"abc"] and p.read() == b""
    with pytest.raises(ConnectionResetError):
        p.write(b"x")


def test_a_cut_while_stalled_loses_what_was_held() -> None:
    a, b = pipe_pair(Faults(stall_at=1))
    a.send(b"xyz")
    a.cut(lose_in_flight=False)
    assert b.recv() == b"x" and b.recv() == b""
    assert a.recv() == b""


def test_a_reset_loses_everything_unread() -> None:
    a, b = pipe_pair()
    a.send(b"xyz")
    assert b.recv(1) == b"x"
    a.cut()
    assert b.recv() == b""
