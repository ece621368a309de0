"""Issue 14 item 5: streams written by the 0.1.0 release still load, to the same state.

``tests/fixtures/streams`` holds an offline save per architecture written by that release
(``make.py``), and the digests of the state it saved.  Each stream is decoded and loaded
into a VM built on the same host; every component must come back with the saved digest.
"""

from __future__ import annotations

import importlib.util
import json
import lzma
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vmferry.clock import ManualClock
from vmferry.machine import VM, create_vm
from vmferry.migration.destination import DestinationSession
from vmferry.migration.stream import ComponentRecord, DeviceChunk, StreamDecoder

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "streams"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "expected.json").read_text())


def _spec() -> ModuleType:
    spec = importlib.util.spec_from_file_location("streams_spec", FIXTURES / "streams_spec.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPEC = _spec()


def load(name: str) -> tuple[VM, dict[str, Any], list[object]]:
    host = SPEC.host_context(name)
    session = DestinationSession(ManualClock(), verify=True,
                                 factory=lambda d: create_vm(d, host))
    decoder = StreamDecoder()
    decoder.feed(lzma.decompress((FIXTURES / f"{name}.vmf.xz").read_bytes()))
    records = list(decoder.events())
    decoder.eof()
    for rec in records:
        session.receive(rec)
    ack = session.finish(start=False)
    assert session.vm is not None
    return session.vm, ack, records


@pytest.mark.parametrize("name", sorted(EXPECTED["streams"]))
def test_item5_release_stream_loads_to_the_saved_state(name: str) -> None:
    vm, ack, _ = load(name)
    try:
        assert ack["digests"] == EXPECTED["streams"][name]
    finally:
        vm.close()


def test_item5_fixtures_carry_every_component_envelope() -> None:
    kinds: dict[str, set[str]] = {}
    for name in EXPECTED["streams"]:
        vm, _, records = load(name)
        vm.close()
        kinds[name] = ({r.name for r in records if isinstance(r, ComponentRecord)}
                       | {r.device for r in records if isinstance(r, DeviceChunk)})
    assert {"arm64"} <= kinds["arm64"]
    assert {"spapr-tce", "spapr-dma:nic0", "pseries-dt"} <= kinds["pseries"]
    assert {"nic0", "blk0", "acc0"} <= kinds["generic"]


def test_item5_a_changed_byte_in_a_component_is_refused() -> None:
    from vmferry.errors import VmferryError

    host = SPEC.host_context("pseries")
    _, _, records = load("pseries")
    session = DestinationSession(ManualClock(), factory=lambda d: create_vm(d, host))
    with pytest.raises(VmferryError):
        for rec in records:
            if isinstance(rec, ComponentRecord) and rec.name == "spapr-tce":
                rec = ComponentRecord(rec.name, b"XXXX" + bytes(rec.data)[4:])
            session.receive(rec)
        session.finish(start=False)
