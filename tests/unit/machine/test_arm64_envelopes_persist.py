"""Issue 14 item 5: the arm64 handler's envelope (``A64H``) and the arm64 component's
record header (``A64C``) are declared on the persist codec.  The bytes are those the
earlier release wrote (its fixture stream loads: tests/unit/migration/
test_fixture_streams.py); a damaged header is refused with a typed error naming what is
wrong, and the handler keeps nothing of it."""

from __future__ import annotations

import struct

import pytest

from vmferry.errors import MalformedRecord
from vmferry.machine.arm64 import Arm64StateDecodeError, MergeMode
from vmferry.machine.arm64_component import HEADER, Arm64Component
from vmferry.machine.arm64_handler import ENVELOPE, Arm64Handler
from vmferry.machine.handlers import ComponentData
from vmferry.machine.profiles import load_profile

K5 = "arm64-linux-5.19"


def test_item5_envelope_bytes_are_the_earlier_releases() -> None:
    # what the earlier release packed by hand: struct ">4sB" and ">4sHI"
    assert ENVELOPE.encode({"merge": 2}, 1) == struct.pack(">4sB", b"A64H", 2)
    assert ENVELOPE.encode({"merge": 1}, 1) == struct.pack(">4sB", b"A64H", 1)
    assert HEADER.encode({"machine_len": 300}) == struct.pack(">4sHI", b"A64C", 1, 300)


def test_item5_saved_component_round_trips_through_its_header() -> None:
    comp = Arm64Component(load_profile(K5))
    comp.boot()
    data = comp.save_state()
    head, at = HEADER.decode_head(data)
    assert data[:at] == struct.pack(">4sHI", b"A64C", 1, head["machine_len"])
    other = Arm64Component(load_profile(K5))
    other.load_state(data)
    assert other.machine.save() == comp.machine.save()


@pytest.mark.parametrize("data, what", [
    (b"A64C\x00", "shorter"),
    (b"A64X\x00\x01\x00\x00\x00\x00", "magic"),
    (b"A64C\x00\x07\x00\x00\x00\x00", "version"),
    (b"A64C\x00\x01\x00\x00\x01\x00", "runs past"),
])  # fmt: skip
def test_item5_component_header_refused_typed(data: bytes, what: str) -> None:
    comp = Arm64Component(load_profile(K5))
    with pytest.raises(Arm64StateDecodeError, match=what) as info:
        comp.load_state(data)
    assert info.value.offset is not None
    assert not comp.machine.started


@pytest.mark.parametrize("data, what", [
    (b"A64", "shorter"),
    (b"A64X\x01", "names no version"),
    (b"A64H\x03", "merge"),
])  # fmt: skip
def test_item5_handler_envelope_refused_typed(data: bytes, what: str) -> None:
    handler = Arm64Handler(load_profile(K5))
    handler.load(ComponentData("arm64", data))
    with pytest.raises(MalformedRecord, match=f"bad state envelope.*{what}"):
        handler.load_complete()
    assert handler.merge is MergeMode.STRICT and not handler.loaded
