from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import (
    BadMagic,
    ChecksumMismatch,
    MalformedRecord,
    OversizedRecord,
    StreamDecodeError,
    StreamUsageError,
    TruncatedRecord,
    UnknownRecord,
    UnsupportedVersion,
)
from vmferry.migration.stream import (
    ComponentRecord,
    DeviceChunk,
    DevicePhase,
    End,
    PassEnd,
    RamPages,
    RamScatter,
    RamZero,
    StreamDecoder,
    StreamEncoder,
    VcpuRecord,
    VmConfig,
)
from vmferry.migration.stream import format as fmt
from vmferry.migration.stream.inspect import summarize

RECORDS = [
    VmConfig({"name": "s", "memory_mib": 4}),
    RamZero(0, 3, 4096),
    RamPages(3 * 4096, 4096, bytes(range(256)) * 32),
    VcpuRecord(0, ((1, 2), (0x6030_0000_0014_0000, 0xFFFF_FFFF_FFFF_FFFF))),
    DeviceChunk("nic0", DevicePhase.STOP_COPY, 0, b"state"),
    ComponentRecord("tce", b"\x00\x01"),
    PassEnd(1, 5),
    RamScatter(4096, np.array([5, 9, 200], dtype=np.int64), bytes(3 * 4096)),
    RamScatter(4096, np.array([7], dtype=np.int64), b"", zero=True),
    End(),
]


def stream() -> bytes:
    return StreamEncoder().encode_all(RECORDS)


def decode(data: bytes, step: int | None = None) -> list[object]:
    dec = StreamDecoder()
    out: list[object] = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        dec.feed(data[i : i + step])
        out += [_freeze(r) for r in dec.events()]
    dec.eof()
    return out


def _freeze(r: object) -> object:
    if isinstance(r, RamPages):
        return RamPages(r.gpa, r.page_size, bytes(r.data))
    if isinstance(r, RamScatter):
        return RamScatter(r.page_size, r.pages.copy(), bytes(r.data), r.zero)
    return r


@pytest.mark.parametrize("step", [1, 7, 4096, None])
def test_roundtrip_any_split(step: int | None) -> None:
    got = decode(stream(), step)
    assert got == [
        r if not isinstance(r, RamPages) else RamPages(r.gpa, r.page_size, bytes(r.data))
        for r in RECORDS
    ]


def test_zero_copy_receive_path() -> None:
    data = stream()
    dec = StreamDecoder()
    pos, out = 0, []
    while not dec.done:
        view = dec.writable()
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        dec.wrote(n)
        pos += n
        out += list(dec.events())
    assert pos == len(data) and len(out) == len(RECORDS)


def _patch(data: bytes, offset: int, raw: bytes) -> bytes:
    return data[:offset] + raw + data[offset + len(raw) :]


def test_bad_magic() -> None:
    with pytest.raises(BadMagic):
        decode(_patch(stream(), 0, b"QEMU"))


def test_newer_major_or_minor_version() -> None:
    with pytest.raises(UnsupportedVersion):
        decode(_patch(stream(), 8, struct.pack(">H", 2)))
    with pytest.raises(UnsupportedVersion):
        decode(_patch(stream(), 10, struct.pack(">H", fmt.MINOR + 1)))


def test_unknown_record_type() -> None:
    with pytest.raises(UnknownRecord):
        decode(_patch(stream(), 16, struct.pack(">H", 99)))
    with pytest.raises(UnknownRecord):
        decode(_patch(stream(), 16, struct.pack(">H", 0)))


def test_oversized_length_rejected_before_payload() -> None:
    data = _patch(stream(), 20, struct.pack(">I", 0xFFFF_FFFF))
    dec = StreamDecoder()
    with pytest.raises(OversizedRecord):
        dec.feed(data[:24])
        list(dec.events())
    assert dec._buf.size <= 64 * 1024  # nothing allocated for the claimed length


def test_bad_checksum() -> None:
    data = bytearray(stream())
    data[40] ^= 1  # inside the VM configuration payload
    with pytest.raises(ChecksumMismatch):
        decode(bytes(data))


def test_truncated() -> None:
    data = stream()
    for cut in (0, 10, 17, 30, len(data) - 1):
        with pytest.raises(TruncatedRecord):
            decode(data[:cut])


def test_trailing_garbage() -> None:
    with pytest.raises(StreamDecodeError):
        decode(stream() + b"x")


def test_errors_are_sticky() -> None:
    dec = StreamDecoder()
    dec.feed(b"NOTASTREAM012345")
    with pytest.raises(BadMagic):
        dec.next_event()
    with pytest.raises(BadMagic):
        dec.feed(b"more")


def test_malformed_payloads() -> None:
    enc = StreamEncoder()
    with pytest.raises(MalformedRecord):
        RamPages.parse(fmt.RAM_PAGES.pack(0, 2, 4096) + b"\0" * 4096)
    with pytest.raises(MalformedRecord):
        RamZero.parse(fmt.RAM_ZERO.pack(3, 1, 4096))
    with pytest.raises(MalformedRecord):
        VcpuRecord.parse(fmt.VCPU.pack(0, 2) + fmt.REG.pack(1, 1) * 2)  # duplicate id
    with pytest.raises(MalformedRecord):
        VmConfig.parse(b"[1, 2]")
    with pytest.raises(StreamUsageError):
        enc.encode(End())  # before the header


@pytest.mark.parametrize("payload", [
    fmt.RAM_SCATTER.pack(2, 4096, 0) + np.array([3, 3], ">u8").tobytes() + bytes(8192),
    fmt.RAM_SCATTER.pack(2, 4096, 0) + np.array([4, 3], ">u8").tobytes() + bytes(8192),
    fmt.RAM_SCATTER.pack(1, 4096, 0) + np.array([1], ">u8").tobytes() + bytes(100),
    fmt.RAM_SCATTER.pack(0, 4096, 1),
    fmt.RAM_SCATTER.pack(1, 4096, 2) + np.array([1], ">u8").tobytes(),
    fmt.RAM_SCATTER.pack(1, 8192, 1) + np.array([1], ">u8").tobytes(),
    b"\0\0",
])
def test_malformed_scatter(payload: bytes) -> None:
    with pytest.raises(MalformedRecord):
        RamScatter.parse(payload)


def test_usage_after_end() -> None:
    enc = StreamEncoder()
    enc.encode_all([End()])
    with pytest.raises(StreamUsageError):
        enc.encode(PassEnd(1, 1))


def test_summary() -> None:
    s = summarize([stream()])
    assert s.complete and s.pages_raw == 2 + 3 and s.pages_zero == 3 + 1
    assert s.vcpus == {0: 2} and s.devices["nic0"]["bytes"] == 5 and "tce" in s.components


# --- fuzzing: only typed errors, never a hostile allocation -----------------------------

VALID = stream()


@given(st.data())
def test_fuzz_truncations_and_bit_flips(data: st.DataObject) -> None:
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    cut = data.draw(st.integers(0, len(raw)))
    step = data.draw(st.integers(1, 64))
    assert_decodes_or_typed_error(bytes(raw[:cut]), step)


@given(kind=st.integers(0, 0xFFFF), length=st.integers(0, 0xFFFF_FFFF), tail=st.binary(max_size=64))
def test_fuzz_hostile_headers(kind: int, length: int, tail: bytes) -> None:
    head = StreamEncoder().header()
    dec = StreamDecoder()
    try:
        dec.feed(head + fmt.RECORD_HEADER.pack(kind, 0, length) + tail)
        list(dec.events())
        dec.eof()
    except StreamDecodeError:
        pass
    assert dec._buf.size <= 64 * 1024


@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(blob: bytes) -> None:
    assert_decodes_or_typed_error(VALID[:16] + blob)


def assert_decodes_or_typed_error(data: bytes, step: int | None = None) -> None:
    """Decoding either yields records the codec defines or raises a typed error saying why;
    any other exception escapes and fails the test."""
    try:
        records = decode(data, step)
    except StreamDecodeError as exc:
        assert str(exc), "a typed decode error must say what is wrong"
    else:
        assert all(type(r).__module__.startswith("vmferry.migration.stream") for r in records)
