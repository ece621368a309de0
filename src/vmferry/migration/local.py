"""The in-process transport: a source session's stream straight into a destination session.

Used wherever both ends live in one process -- the compatibility matrix, benchmarks of the
engine alone, tests.  Time is simulated: after each batch the clock advances by the batch's
size over ``link_bytes_per_s`` and ``on_time`` learns how much guest time passed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmferry.clock import ManualClock
from vmferry.errors import MigrationError
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import SourceSession
from vmferry.migration.stream import StreamDecoder

DEFAULT_LINK_BYTES_PER_S = 1e9


def transfer(
    source: SourceSession,
    destination: DestinationSession,
    clock: ManualClock,
    *,
    link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S,
    on_time: Callable[[float], object] | None = None,
) -> None:
    """Move the whole stream (source.start() through END) into ``destination``; the
    destination's switchover ack (when both sessions use it) goes back at once."""
    decoder = StreamDecoder()
    bufs = source.start()
    while bufs or source.ack.awaiting:
        n = 0
        for buf in bufs:
            decoder.feed(buf)
            n += len(buf)
        for rec in decoder.events():
            destination.receive(rec)
        ack = destination.take_switchover_ack()
        if ack is not None:
            source.switchover_acknowledged(ack)
        elif not bufs:
            raise MigrationError("the source waits for a switchover ack the destination "
                                 "never sends", "switchover ack")  # fmt: skip
        dt = n / link_bytes_per_s
        clock.advance(dt)
        if on_time is not None:
            on_time(dt)
        bufs = source.next_buffers()
    decoder.eof()


def migrate_locally(
    source: SourceSession,
    destination: DestinationSession,
    clock: ManualClock,
    **kw: Any,
) -> dict[str, Any]:
    """A whole migration in process: transfer, load, verify, commit, resume, complete;
    returns the ack.  The exchange is the one the hosts run (LOADED, the source's check
    of the destination's digests, COMMIT, RESUMED): a verification mismatch fails the
    source session (its guest resumes), discards the destination's VM and raises
    MigrationError at step ``verification``."""
    transfer(source, destination, clock, **kw)
    source.switchover_digests()
    ack = destination.finish(start=False)  # LOADED
    source.loaded()
    report = source.verification(ack)
    if report["requested"] and not report["commit_allowed"]:
        reason = f"destination state differs from the source's in {report['blocking']}"
        destination.abort()
        source.fail("verification", reason)
        raise MigrationError(reason, "verification")
    ack["post_load"] = destination.resume()  # COMMIT, then RESUMED
    source.complete(ack)
    return ack
