"""Frame layout, typed bodies and statuses."""

from __future__ import annotations

import errno
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry import errors as E
from vmferry.migration.channel.frames import (
    HEADER,
    MAX_CONTROL,
    MAX_DATA,
    Command,
    Hello,
    Loaded,
    Welcome,
    decode_body,
    decode_header,
    encode,
)
from vmferry.migration.channel.status import CLASSES, ErrorKind, Status


def frame(ev: object) -> bytes:
    return b"".join(bytes(b) for b in encode(ev))  # type: ignore[arg-type]


def roundtrip(ev: object) -> object:
    raw = frame(ev)
    header = decode_header(raw[: HEADER.size])
    return decode_body(header, raw[HEADER.size :])


def test_command_zero_is_invalid_and_values_are_explicit() -> None:
    assert Command.INVALID == 0
    assert [c.value for c in Command] == list(range(len(Command)))
    with pytest.raises(E.RemoteChannelError, match="unknown channel command 0x0000"):
        decode_header(HEADER.pack(0, 0, 0, 0))
    with pytest.raises(E.RemoteChannelError, match="unknown channel command 0x0063"):
        decode_header(HEADER.pack(99, 0, 0, 0))


def test_limits_and_reserved_flags_are_checked_before_buffering() -> None:
    with pytest.raises(E.RemoteChannelError, match="over the"):
        decode_header(HEADER.pack(Command.LOADED, 0, MAX_CONTROL + 1, 0))
    with pytest.raises(E.RemoteChannelError, match="over the"):
        decode_header(HEADER.pack(Command.DATA, 0, MAX_DATA + 1, 0))
    with pytest.raises(E.RemoteChannelError, match="reserved flags"):
        decode_header(HEADER.pack(Command.COMMIT, 1, 0, 0))


def test_a_tls_record_is_named_as_such() -> None:
    with pytest.raises(E.RemoteChannelError, match="speaks TLS"):
        decode_header(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00")


def test_the_version_travels_in_hello_and_another_major_is_refused() -> None:
    hello = Hello("t", (1, 0), "running", "A", major=1, minor=7)
    assert roundtrip(hello) == hello  # same major, newer minor: accepted
    with pytest.raises(E.RemoteChannelError, match=r"protocol 2\.0 is not supported"):
        roundtrip(Hello("t", (1, 0), "running", "A", major=2, minor=0))
    with pytest.raises(E.RemoteChannelError, match="magic"):
        raw = bytearray(frame(Welcome("B")))
        raw[HEADER.size] ^= 0xFF
        body = bytes(raw[HEADER.size :])
        decode_body(decode_header(HEADER.pack(Command.WELCOME, 0, len(body),
                                              zlib.crc32(body))), body)  # fmt: skip


def test_bodies_are_checked_field_by_field() -> None:
    def forged(cmd: Command, body: bytes) -> object:
        return decode_body(decode_header(HEADER.pack(cmd, 0, len(body), zlib.crc32(body))),
                           body)  # fmt: skip

    with pytest.raises(E.RemoteChannelError, match="keys"):
        forged(Command.LOADED, b'{"ack": {}, "extra": 1}')
    with pytest.raises(E.RemoteChannelError, match=r"LOADED\.ack is list"):
        forged(Command.LOADED, b'{"ack": []}')
    with pytest.raises(E.RemoteChannelError, match="not JSON"):
        forged(Command.COMMIT, b"\xff")
    with pytest.raises(E.RemoteChannelError, match="unknown error kind"):
        forged(Command.ERROR, b'{"status": {"kind": 0, "step": "", "message": "", "code": 0}}')
    assert forged(Command.LOADED, b'{"ack": {"pages": 3}}') == Loaded({"pages": 3})


@given(st.binary(min_size=1, max_size=64), st.integers(0, 63))
def test_any_damaged_control_frame_is_refused(body: bytes, flip: int) -> None:
    raw = bytearray(frame(Loaded({"blob": body.hex()})))
    i = HEADER.size + flip % (len(raw) - HEADER.size)
    raw[i] ^= 0x01
    with pytest.raises(E.RemoteChannelError, match="damaged LOADED"):
        decode_body(decode_header(bytes(raw[: HEADER.size])), bytes(raw[HEADER.size :]))


@pytest.mark.parametrize("exc", [
    E.MigrationCancelled("operator", "ram pass 2"),
    E.MigrationRefused("no psci 1.0 here", "pre-flight"),
    E.ChecksumMismatch("record 3", 4096),
    E.MalformedRecord("END before vCPUs"),
    E.ConfigError("stream carries VM 'x'"),
    E.KernelError(errno.EINVAL, "bad state"),
    E.ApiError(409, "exists"),
    E.RemoteChannelError("damaged COMMIT", "deciding"),
    E.ChannelTimeout("no LOADED in 120 s", "loading"),
])  # fmt: skip
def test_errors_come_back_as_the_same_class(exc: E.VmferryError) -> None:
    status = Status.from_json(Status.from_exception(exc).to_json())
    back = status.exception()
    assert type(back) is type(exc) and str(back) == str(exc)


def test_subclasses_travel_as_their_ancestor_and_foreign_errors_as_internal() -> None:
    from vmferry.hw.vfio.errors import VfioError

    back = Status.from_exception(VfioError(errno.ENODEV, "gone")).exception()
    assert type(back) is E.KernelError and back.errno == errno.ENODEV
    status = Status.from_exception(ZeroDivisionError("x"), "load")
    assert status.kind is ErrorKind.INTERNAL and "ZeroDivisionError" in status.message
    assert type(status.exception()) is E.MigrationError


def test_every_kind_but_invalid_and_internal_has_a_class() -> None:
    assert set(CLASSES) == set(ErrorKind) - {ErrorKind.INVALID, ErrorKind.INTERNAL}
    with pytest.raises(E.LocalChannelError):
        Status(ErrorKind.INVALID, "", "")
