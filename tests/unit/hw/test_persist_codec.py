"""Issue 14 item 5: the declarative persist codec (``vmferry.hw.persist``)."""

from __future__ import annotations

import enum
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import BadMagic, MalformedRecord, TruncatedRecord, UnsupportedVersion
from vmferry.hw.devtree.fdt import STATE_LAYOUT as TREE_LAYOUT
from vmferry.hw.persist import Field, Layout, enum16
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
