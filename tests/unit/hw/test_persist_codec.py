"""Issue 14 item 5: the declarative persist codec (``vmferry.hw.persist``)."""

from __future__ import annotations

import enum
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import (
    BadMagic,
    MalformedRecord,
    StreamDecodeError,
    TruncatedRecord,
    UnsupportedVersion,
)
from vmferry.hw.devtree.fdt import STATE_LAYOUT as TREE_LAYOUT
from vmferry.hw.persist import (
    TAG4,
    Field,
    Layout,
    StructLayout,
    StructVersion,
    enum16,
    write_version,
)
from vmferry.hw.spapr.dmadev import STATE_LAYOUT as DMA_LAYOUT
from vmferry.hw.spapr.dmadev import DmaEngineState, decode_state, encode_state


class Colour(enum.IntEnum):
    RED = 7
    BLUE = 3  # declared after RED with a smaller value: position must not matter


LAYOUT = Layout("probe", b"PRBE", 2, (Field("a", "u32"), enum16("c", Colour),
                                      Field("name", "str16"), Field("blob", "bytes32")),
                accepts=frozenset({1}))


@given(st.integers(0, 2**32 - 1), st.sampled_from(list(Colour)), st.text(max_size=40),
       st.binary(max_size=64))
def test_item5_roundtrip(a: int, c: Colour, name: str, blob: bytes) -> None:
    data = LAYOUT.encode({"a": a, "c": c, "name": name, "blob": blob})
    out = LAYOUT.decode(data)
    assert (out["a"], out["c"], out["name"], out["blob"], out["version"]) == (a, c, name, blob, 2)


def test_item5_enums_travel_by_explicit_value() -> None:
    data = LAYOUT.encode({"a": 0, "c": Colour.BLUE, "name": "", "blob": b""})
    assert struct.unpack_from(">H", data, 10)[0] == 3
    bad = data[:10] + struct.pack(">H", 1) + data[12:]
    with pytest.raises(MalformedRecord, match="not a Colour"):
        LAYOUT.decode(bad)


def test_item5_header_checks_come_first_with_typed_errors() -> None:
    good = LAYOUT.encode({"a": 1, "c": Colour.RED, "name": "x", "blob": b"yz"})
    with pytest.raises(TruncatedRecord):
        LAYOUT.decode(good[:5])
    with pytest.raises(BadMagic):
        LAYOUT.decode(b"XXXX" + good[4:])
    with pytest.raises(UnsupportedVersion):
        LAYOUT.decode(good[:4] + struct.pack(">H", 3) + good[6:])
    assert LAYOUT.decode(good[:4] + struct.pack(">H", 1) + good[6:])["version"] == 1
    with pytest.raises(MalformedRecord):
        LAYOUT.decode(good + b"!")
    with pytest.raises(MalformedRecord):
        LAYOUT.decode(good[:-1])


def test_item5_declarations_are_checked() -> None:
    with pytest.raises(ValueError):
        Layout("x", b"XX", 1, ())
    with pytest.raises(ValueError):
        Layout("x", b"XXXX", 1, (Field("s", "str16"), Field("n", "u32")))
    with pytest.raises(ValueError):
        Field("n", "u24")


def test_item5_dma_and_tree_layouts_keep_the_release_bytes() -> None:
    state = DmaEngineState(0x80000000, 0x10000, 4, 2, 9, 4096, 1, "halted: fault")
    legacy = struct.pack(">4sHIQIIQQIH", b"SDMA", 1, 0x80000000, 0x10000, 4, 2, 9, 4096, 1,
                         13) + b"halted: fault"
    assert encode_state(state) == legacy and decode_state(legacy) == state
    assert DMA_LAYOUT.header_size == struct.calcsize(">4sHIQIIQQIH")
    assert TREE_LAYOUT.encode({"dtb": b"abc"}) == struct.pack(">4sHI", b"VFDT", 1, 3) + b"abc"


def test_item5_repeated_envelopes_keep_their_headers() -> None:
    from vmferry.hw.spapr.persist import HEADER as TCE_HEADER
    from vmferry.machine.arm64 import HEADER as ARM64_HEADER
    from vmferry.machine.arm64 import Arm64StateDecodeError, decode_state

    assert TCE_HEADER.encode({"windows": 2}) == struct.pack(">4sHH", b"STCE", 1, 2)
    assert ARM64_HEADER.encode({"vcpus": 3}) == struct.pack(">4sHH", b"A64V", 1, 3)
    with pytest.raises(Arm64StateDecodeError, match="magic"):
        decode_state(b"XXXX" + bytes(4))
    with pytest.raises(Arm64StateDecodeError, match="version"):
        decode_state(struct.pack(">4sHH", b"A64V", 9, 0))
    with pytest.raises(ValueError):
        LAYOUT.decode_head(b"")


def test_item5_components_keep_the_contract_a_refused_restore_changes_nothing() -> None:
    import dataclasses

    from vmferry.hw.persist import Persist
    from vmferry.hw.spapr.dmadev import DmaDeviceError
    from vmferry.machine import create_vm

    vm = create_vm({"name": "p", "arch": "pseries", "memory_mib": 64, "vcpus": 1,
                    "tce_windows": [{"liobn": 0x80000000, "offset": 0, "size_mib": 256,
                                     "page_shift": 16}],
                    "dma_devices": [{"name": "nic0", "liobn": 0x80000000, "buffers": 4}]})
    try:
        handler = vm.handlers["spapr-dma:nic0"]
        engine: Persist[DmaEngineState] = handler.device  # type: ignore[attr-defined]
        before = engine.save()
        assert decode_state(encode_state(before)) == before
        bad = dataclasses.replace(before, ring_size=4, head=9)
        with pytest.raises(DmaDeviceError):
            engine.restore(bad)
        assert engine.save() == before
    finally:
        vm.close()


# --- StructLayout: a fixed struct whose versions its first field tells apart -------------


class Mode(enum.IntEnum):
    OFF = 4
    ON = 1  # declared after OFF with a smaller value: position must not matter


STRUCT = StructLayout("probe struct", Field("magic", "u64"), (
    StructVersion(1, 0xAA, (Field("mode", "u32", Mode), Field("regs", "u16", count=3))),
    StructVersion(2, 0xBB, (Field("mode", "u32", Mode), Field("major", "u16"),
                            Field("regs", "u16", count=2))),
))  # fmt: skip


@given(st.sampled_from(list(Mode)), st.tuples(*[st.integers(0, 0xFFFF)] * 3))
def test_item5_struct_layout_round_trips_each_version(mode: Mode, regs: tuple[int, ...]) -> None:
    v1 = STRUCT.encode({"mode": mode, "regs": regs}, 1)
    assert v1 == struct.pack("<QI3H", 0xAA, int(mode), *regs)
    assert STRUCT.decode(v1) == {"version": 1, "mode": mode, "regs": regs}
    v2 = STRUCT.encode({"mode": mode, "major": 1, "regs": regs[:2]}, 2)
    assert STRUCT.version_of(v2) == 2 and STRUCT.size(2) == len(v2) == 18
    assert STRUCT.decode(v2) == {"version": 2, "mode": mode, "major": 1, "regs": regs[:2]}
    offset, one = STRUCT.field_at(2, "regs")
    assert offset == 14 and one.unpack_from(v2, offset) == regs[:2]


def test_item5_struct_layout_typed_errors() -> None:
    good = STRUCT.encode({"mode": Mode.ON, "regs": (1, 2, 3)}, 1)
    with pytest.raises(TruncatedRecord):
        STRUCT.version_of(good[:7])
    with pytest.raises(UnsupportedVersion, match="magic 0xcc names no version"):
        STRUCT.decode(struct.pack("<Q", 0xCC) + good[8:])
    with pytest.raises(TruncatedRecord):
        STRUCT.decode(good[:-1])
    with pytest.raises(MalformedRecord):
        STRUCT.decode(good + b"\0")
    with pytest.raises(MalformedRecord, match="mode 2 is not a Mode"):
        STRUCT.decode(good[:8] + struct.pack("<I", 2) + good[12:])
    with pytest.raises(ValueError):
        STRUCT.encode({"mode": Mode.ON, "regs": (1, 2, 3)}, 3)
    assert STRUCT.newest == 2


@given(st.binary(max_size=24))
def test_item5_struct_layout_garbage_is_a_typed_decode_error_or_a_struct(data: bytes) -> None:
    try:
        out = STRUCT.decode(data)
    except StreamDecodeError:
        return
    assert STRUCT.encode(out, out["version"]) == data


def test_item5_struct_layout_declarations_are_checked() -> None:
    with pytest.raises(ValueError):  # two versions with one key
        StructLayout("x", Field("m", TAG4), (StructVersion(1, b"AAAA", ()),
                                            StructVersion(2, b"AAAA", ())))
    with pytest.raises(ValueError):  # a key of the wrong kind
        StructLayout("x", Field("m", TAG4), (StructVersion(1, 5, ()),))
    with pytest.raises(ValueError):  # variable fields have no place in a fixed struct
        StructLayout("x", Field("m", "u32"), (StructVersion(1, 5, (Field("s", "str16"),)),))
    with pytest.raises(ValueError):  # arrays are for StructLayout
        Layout("x", b"XXXX", 1, (Field("a", "u32", count=2),))
    with pytest.raises(ValueError):
        Field("a", "str16", count=2)


@pytest.mark.parametrize(("readable", "want"), [(None, 1), (1, 1), (2, 2), (9, 2)])
def test_item5_write_version_is_the_newest_both_read(readable: object, want: int) -> None:
    assert write_version("probe", 2, readable) == want


@pytest.mark.parametrize("readable", ["2", 0, -1, True, 2.0])
def test_item5_malformed_announced_version_is_a_typed_error(readable: object) -> None:
    with pytest.raises(MalformedRecord, match="probe state version"):
        write_version("probe", 2, readable)
