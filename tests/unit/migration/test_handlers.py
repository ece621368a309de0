"""The engine calls migration handlers at the right points, in order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from tests.unit.migration.test_engine import Link, vm_with
from vmferry.clock import ManualClock
from vmferry.errors import MalformedRecord, MigrationRefused
from vmferry.machine import VM, create_vm
from vmferry.machine.handlers import (
    ComponentData,
    DeviceData,
    DevicePhase,
    MigrationHandler,
    StatePiece,
)
from vmferry.migration.source import MigrationParams, SourceSession


class Counter(MigrationHandler):
    """A device whose counter runs with guest time; pre-copy sends deltas."""

    name = "counter"

    def __init__(self, calls: list[str], refuse: bool = False, bad_load: bool = False) -> None:
        self.calls, self.refuse, self.bad_load = calls, refuse, bad_load
        self.value = 0
        self.running = True
        self.seq = 0
        self.loaded: list[int] = []

    @property
    def device_ids(self) -> frozenset[str]:
        return frozenset({"ctr0"})

    def advance(self, seconds: float) -> None:
        if self.running:
            self.value += 1

    def capabilities(self) -> dict[str, Any]:
        return {"counter": True}

    def preflight(self, destination: Mapping[str, Any] | None,
                  options: Mapping[str, Any]) -> list[str]:
        self.calls.append(f"preflight:{destination}")
        if self.refuse:
            raise MigrationRefused("counter: destination cannot count")
        return ["counter warning"]

    def _piece(self, phase: DevicePhase) -> DeviceData:
        self.seq += 1
        return DeviceData("ctr0", phase, self.seq, self.value.to_bytes(8, "big"))

    def save_setup(self) -> None:
        self.calls.append("save_setup")

    def save_iterate(self) -> Sequence[StatePiece]:
        self.calls.append("save_iterate")
        return (self._piece(DevicePhase.PRE_COPY),)

    def pending_bytes(self) -> int:
        return 8

    def quiesce(self) -> None:
        self.calls.append("quiesce")
        self.running = False

    def save_complete(self) -> Sequence[StatePiece]:
        self.calls.append("save_complete")
        return (self._piece(DevicePhase.STOP_COPY), ComponentData("counter", b"meta"))

    def save_cleanup(self) -> None:
        self.calls.append("save_cleanup")

    def save_failed(self) -> None:
        self.calls.append("save_failed")
        self.running = True

    def load_setup(self) -> None:
        self.calls.append("load_setup")

    def load(self, piece: StatePiece) -> None:
        if isinstance(piece, DeviceData):
            self.loaded.append(int.from_bytes(piece.data, "big"))
        else:
            self.calls.append(f"load_component:{bytes(piece.data).decode()}")

    def load_complete(self) -> None:
        self.calls.append("load_complete")
        if self.bad_load:
            raise MalformedRecord("counter state rejected")
        self.value = self.loaded[-1]

    def load_failed(self) -> None:
        self.calls.append("load_failed")

    def post_load(self) -> dict[str, Any]:
        return {"value": self.value}

    def state_digest(self) -> str:
        return str(self.value)


def counter_vm(calls: list[str], **kw: Any) -> VM:
    vm = vm_with(rate=20)
    vm.add_handler(Counter(calls, **kw))
    return vm


def test_hooks_in_order_and_state_arrives() -> None:
    src_calls: list[str] = []
    dst_calls: list[str] = []
    vm = counter_vm(src_calls)
    link = Link(vm, MigrationParams())
    link.dst.factory = lambda d: _with_counter(d, dst_calls)
    assert link.src.preflight({"counter": {"counter": True}}) == ["counter warning"]
    out = link.run()
    assert src_calls[0] == "preflight:{'counter': True}" and src_calls[1] == "save_setup"
    assert src_calls.index("quiesce") < src_calls.index("save_complete")
    assert src_calls[-1] == "save_cleanup" and "save_failed" not in src_calls
    assert dst_calls == ["load_setup", "load_component:meta", "load_complete"]
    assert out["ack"]["digests"]["handler:counter"] == out["source"]["handler:counter"]
    assert out["ack"]["post_load"] == {"counter": {"value": vm.handlers["counter"].value}}
    assert link.src.stats.device_bytes == 8 * (len(link.src.stats.passes) + 1)


def _with_counter(d: Mapping[str, Any], calls: list[str], **kw: Any) -> VM:
    vm = create_vm(d)
    vm.add_handler(Counter(calls, **kw))
    return vm


def test_refusal_changes_nothing() -> None:
    calls: list[str] = []
    vm = counter_vm(calls, refuse=True)
    src = SourceSession(vm, MigrationParams(), ManualClock())
    with pytest.raises(MigrationRefused, match="cannot count"):
        src.preflight({})
    assert vm.running and not vm.ram.logging


def test_failure_gives_the_device_back() -> None:
    calls: list[str] = []
    vm = counter_vm(calls)
    link = Link(vm, MigrationParams())
    link.push(link.src.start())
    link.src.fail("ram pass 1", "test")
    assert calls[-1] == "save_failed" and vm.handlers["counter"].running  # type: ignore[attr-defined]


def test_destination_load_failure_discards() -> None:
    dst_calls: list[str] = []
    link = Link(counter_vm([]), MigrationParams())
    link.dst.factory = lambda d: _with_counter(d, dst_calls, bad_load=True)
    link.push(link.src.start())
    while bufs := link.src.next_buffers():
        link.push(bufs)
    with pytest.raises(MalformedRecord, match="rejected"):
        link.dst.finish()
    link.dst.abort()
    assert dst_calls[-1] == "load_failed" and link.dst.vm is None


def test_unknown_device_state_is_refused() -> None:
    vm = create_vm({"name": "x", "memory_mib": 1})
    with pytest.raises(MalformedRecord, match="unknown device"):
        vm.handler_for(DeviceData("nope", DevicePhase.PRE_COPY, 0, b""))
