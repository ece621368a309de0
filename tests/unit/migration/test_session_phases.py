"""Issue 14 item 4: source and destination sessions have one table of phases each,
refuse a call in the wrong phase, and move to FAILED on any error (a failed source
session never answers [] as if its stream were complete)."""

from __future__ import annotations

import pytest

from vmferry.clock import ManualClock
from vmferry.errors import MalformedRecord, StreamUsageError
from vmferry.machine import create_vm
from vmferry.migration.context import STATUS_MOVES, Status
from vmferry.migration.destination import PHASE_MOVES, DestinationSession, Phase
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import StreamDecoder, VmConfig


def _records(mib: int = 2) -> list[object]:
    vm = create_vm({"name": "p", "memory_mib": mib, "fill": "random"})
    src = SourceSession(vm, MigrationParams(offline=True), ManualClock())
    dec = StreamDecoder()
    bufs = src.start()
    while bufs:
        for b in bufs:
            dec.feed(b)
        bufs = src.next_buffers()
    vm.close()
    return list(dec.events())


def test_issue14_4_tables_cover_every_phase() -> None:
    assert set(STATUS_MOVES) == set(Status) and set(PHASE_MOVES) == set(Phase)
    assert STATUS_MOVES[Status.COMPLETED] == frozenset()
    assert PHASE_MOVES[Phase.HANDED_OVER] == PHASE_MOVES[Phase.ABORTED] == frozenset()


def test_issue14_4_destination_walks_its_phases() -> None:
    dst = DestinationSession(ManualClock())
    with pytest.raises(StreamUsageError, match="finish"):
        dst.finish()
    for rec in _records():
        dst.receive(rec)  # type: ignore[arg-type]
    assert dst.phase is Phase.ENDED
    with pytest.raises(StreamUsageError, match=r"resume\(\) in phase ended"):
        dst.resume()
    dst.finish(start=False)
    assert dst.phase is Phase.LOADED
    with pytest.raises(StreamUsageError, match=r"finish\(\) in phase loaded"):
        dst.finish()
    dst.resume(run=False)
    vm = dst.hand_over()
    assert dst.phase is Phase.HANDED_OVER
    dst.abort()  # the guest is the host's now: nothing is discarded
    assert dst.vm is vm
    vm.close()


def test_issue14_4_destination_error_moves_to_failed_then_only_abort() -> None:
    dst = DestinationSession(ManualClock())
    records = _records()
    dst.receive(records[0])  # type: ignore[arg-type]
    with pytest.raises(MalformedRecord):
        dst.receive(records[0])  # type: ignore[arg-type]  # a second configuration
    assert dst.phase is Phase.FAILED
    with pytest.raises(StreamUsageError, match="in phase failed"):
        dst.receive(records[1])  # type: ignore[arg-type]
    dst.abort()
    assert dst.phase is Phase.ABORTED and dst.vm is None
    assert isinstance(records[0], VmConfig)


def test_issue14_4_source_error_moves_to_failed_and_is_never_an_end() -> None:
    vm = create_vm({"name": "s", "memory_mib": 2, "fill": "random"})
    src = SourceSession(vm, MigrationParams(offline=True), ManualClock())
    src.start()

    class Broken(Exception):
        pass

    def broken_pages(*args: object) -> object:
        raise Broken("the guest's memory went away")

    src._page_records = broken_pages  # type: ignore[method-assign]
    with pytest.raises(Broken):
        while src.next_buffers():
            pass
    assert src.status is Status.FAILED and "went away" in src.stats.error
    with pytest.raises(StreamUsageError, match="in status failed"):
        src.next_buffers()  # it used to answer [] here, as if the stream were complete
    stats = src.fail("switchover", "the guest's memory went away")  # still gives it back
    assert stats.status is Status.FAILED
    vm.close()
