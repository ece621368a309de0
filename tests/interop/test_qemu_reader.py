"""The QEMU stream reader on hand-built streams: the record kinds a short QEMU run does not
write (XBZRLE, compressed pages, commands, capabilities) and each structural error."""

from __future__ import annotations

import json
import struct

import pytest

from vmferry.errors import MalformedRecord, StreamDecodeError, TruncatedRecord, UnknownRecord
from vmferry.interop.qemu import read_stream

PAGE = 4096


def _name(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


def _start(t: int, sid: int, idstr: str, instance: int = 0, version: int = 1) -> bytes:
    return bytes([t]) + struct.pack(">I", sid) + _name(idstr) + struct.pack(">II", instance,
                                                                           version)


def _footer(sid: int) -> bytes:
    return b"\x7e" + struct.pack(">I", sid)


def _rec(offset: int, flags: int) -> bytes:
    return struct.pack(">Q", offset | flags)


def build(ram_part: bytes | None = None, *, config: bytes = b"", extra: bytes = b"",
          devices: list[dict[str, object]] | None = None, device: bytes = b"",
          pages: int = 2) -> bytes:
    out = b"QEVM" + struct.pack(">I", 3)
    out += b"\x07" + struct.pack(">I", 6) + b"test-1" + config
    size = pages * PAGE
    setup = _rec(size, 0x04) + _name("blk") + struct.pack(">Q", size) + _rec(0, 0x10)
    out += _start(1, 2, "ram", 0, 4) + setup + _footer(2)
    if ram_part is None:
        ram_part = _rec(0, 0x02) + _name("blk") + b"\x00" + _rec(PAGE, 0x08 | 0x20) + bytes(PAGE)
    out += b"\x02" + struct.pack(">I", 2) + ram_part + _rec(0, 0x10) + _footer(2)
    out += extra
    out += b"\x03" + struct.pack(">I", 2) + _rec(0, 0x10) + _footer(2)
    if devices:
        out += _start(4, 7, "dev") + device + _footer(7)
    out += b"\x00"
    desc = json.dumps({"page_size": PAGE, "devices": devices or []}).encode()
    return out + b"\x06" + struct.pack(">I", len(desc)) + desc


def test_minimal_stream_is_complete() -> None:
    s = read_stream(build())
    assert s.complete and s.machine == "test-1"
    assert s.ram is not None and (s.ram.zero_pages, s.ram.normal_pages) == (1, 1)
    assert s.sections[2].parts == 3 and s.ram.passes == 3


def test_configuration_capabilities_and_uuid() -> None:
    caps = (b"\x05" + _name("configuration/capabilities") + struct.pack(">II", 1, 1)
            + _name("x-ignore-shared"))
    uuid = b"\x05" + _name("configuration/uuid") + struct.pack(">I", 1) + bytes(range(16))
    data = build(config=caps + uuid)
    # with x-ignore-shared every block in the list carries its address
    i = data.index(_name("blk") + struct.pack(">Q", 2 * PAGE)) + 4 + 8
    data = data[:i] + struct.pack(">Q", 0x1000_0000) + data[i:]
    s = read_stream(data)
    assert s.configuration["capabilities"] == ["x-ignore-shared"]
    assert s.configuration["uuid"] == bytes(range(16)).hex()


def test_xbzrle_compressed_and_commands() -> None:
    part = (_rec(0, 0x40) + _name("blk") + b"\x01" + struct.pack(">H", 3) + b"abc"
            + _rec(PAGE, 0x100 | 0x20) + struct.pack(">I", 5) + b"zzzzz")
    cmd = b"\x08" + struct.pack(">HH", 3, 4) + b"\x00\x00\x00\x01"
    s = read_stream(build(part, extra=cmd))
    assert s.ram is not None and (s.ram.xbzrle_pages, s.ram.compressed_pages) == (1, 1)
    assert s.commands and s.commands[0][0] == 3 and s.complete


def test_device_fields_arrays_structs_and_subsections() -> None:
    dev = {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1, "fields": [
        {"name": "a", "type": "uint32", "size": 4},
        {"name": "arr", "type": "uint16", "size": 2, "array_len": 3},
        {"name": "st", "type": "struct", "size": 9, "array_len": 2, "struct": {
            "vmsd_name": "inner", "version": 1,
            "fields": [{"name": "x", "type": "uint8", "size": 1},
                       {"name": "y", "type": "uint64", "size": 8}]}},
        {"name": "n", "type": "int32 le", "size": 4}],
        "subsections": [{"vmsd_name": "dev/extra", "version": 2,
                         "fields": [{"name": "z", "type": "bool", "size": 1}]}]}
    body = (struct.pack(">I", 7) + bytes(6) + bytes(18) + struct.pack(">i", 258)
            + b"\x05" + _name("dev/extra") + struct.pack(">I", 2) + b"\x01")
    s = read_stream(build(devices=[dev], device=body))
    sec = s.sections[7]
    assert sec.kind == "vmstate" and sec.subsections == ["dev/extra"]
    assert sec.fields["arr"].count == 3 and sec.fields["st"].count == 2
    assert sec.fields["dev/extra.z"].size == 1
    n = sec.fields["n"]
    assert data_at(build(devices=[dev], device=body), n.offset, 4) == struct.pack(">i", 258)
    # a subsection the description does not declare is an error naming it
    bad = body.replace(b"dev/extra", b"dev/other")
    with pytest.raises(MalformedRecord, match="'dev/other' of dev is not declared"):
        read_stream(build(devices=[dev], device=bad))


def data_at(data: bytes, offset: int, n: int) -> bytes:
    return data[offset:offset + n]


@pytest.mark.parametrize(("part", "error", "text"), [
    (_rec(0, 0x08 | 0x20) + bytes(PAGE), MalformedRecord, "CONTINUE but no block"),
    (_rec(0, 0x08) + _name("nope") + bytes(PAGE), MalformedRecord, "unknown block 'nope'"),
    (_rec(2 * PAGE, 0x08) + _name("blk") + bytes(PAGE), MalformedRecord, "outside block"),
    (_rec(0, 0x80), UnknownRecord, "RAM record flags 0x80"),
    (_rec(0, 0x02 | 0x08) + _name("blk"), UnknownRecord, "expected one of ZERO"),
    (_rec(0, 0x40) + _name("blk") + b"\x02", MalformedRecord, "XBZRLE encoding flag"),
    (_rec(0, 0x08) + _name("blk") + bytes(100), TruncatedRecord, "page body"),
])
def test_ram_record_errors(part: bytes, error: type[StreamDecodeError], text: str) -> None:
    with pytest.raises(error, match=text) as ei:
        read_stream(build(part))
    assert ei.value.offset is not None


def test_footer_and_section_order_errors() -> None:
    good = build()
    i = good.index(_footer(2))
    with pytest.raises(MalformedRecord, match="names section id 9, expected 2"):
        read_stream(good[:i] + _footer(9) + good[i + 5:])
    with pytest.raises(MalformedRecord, match="expected section footer 0x7e"):
        read_stream(good[:i] + b"\x7f" + good[i + 1:])
    j = good.index(b"\x02" + struct.pack(">I", 2))
    with pytest.raises(MalformedRecord, match="never started"):
        read_stream(good[:j + 1] + struct.pack(">I", 5) + good[j + 5:])


def test_opaque_section_is_skipped_to_its_footer() -> None:
    extra = _start(4, 9, "legacy", 0, 1) + b"\x7e\x00\x00blob" + _footer(9)
    s = read_stream(build(extra=extra))
    assert s.sections[9].kind == "opaque" and s.complete
    assert s.sections[9].bytes == len(extra)


@pytest.mark.parametrize(("kind", "body"), [(0x08, bytes(PAGE)), (0x02, b"\x00")])
@pytest.mark.parametrize("bad", [5, 37, 63])
def test_vectorised_run_rejects_an_offset_outside_its_block(kind: int, body: bytes,
                                                            bad: int) -> None:
    records = [_rec(0, kind) + _name("blk") + body]
    records += [_rec(i * PAGE, kind | 0x20) + body for i in range(1, 64)]
    good = build(b"".join(records), pages=64)
    s = read_stream(good)
    assert s.ram is not None and s.ram.normal_pages + s.ram.zero_pages == 64
    first = good.index(records[1], good.index(records[0]))
    pos = first + (bad - 1) * len(records[1])
    data = bytearray(good)
    struct.pack_into(">Q", data, pos, (64 * PAGE) | kind | 0x20)
    with pytest.raises(MalformedRecord, match="outside block") as ei:
        read_stream(bytes(data))
    assert ei.value.offset == pos
