"""The sending side of the parallel data channels, sans-IO: how a pass's pages are dealt
to the channels and turned into records (the wire format is in
:mod:`vmferry.migration.multichannel`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vmferry.errors import StreamUsageError
from vmferry.machine.ram import GuestRam
from vmferry.migration.multichannel import (
    LIVE_RECORD_BYTES,
    MAX_RECORD_BYTES,
    MAX_SCATTER_PAGES,
    SCATTER_BELOW,
    ChannelWriter,
)
from vmferry.migration.owed import OwedReportReader
from vmferry.migration.runs import page_runs
from vmferry.migration.stream.records import Buffer


def deal_runs(
    starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64], channels: int
) -> list[list[tuple[int, int]]]:
    """Deal page runs to ``channels`` channels round-robin in page order, so that every
    channel works near the same position (the destination populates ahead of it)."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(channels)]
    for k, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        out[k % channels].append((s, n))
    return out


def split_scattered(
    index: npt.NDArray[np.int64], run_pages: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sorted page indexes as (starts, lengths) of runs of at most ``run_pages`` pages,
    and the pages of runs shorter than :data:`SCATTER_BELOW`, which go in SCATTER lists
    (the runs returned are the long ones only)."""
    starts, lengths = page_runs(index, run_pages)
    short = lengths < SCATTER_BELOW
    if not short.any():
        return starts, lengths, np.zeros(0, np.int64)
    # the runs cover ``index`` in order: a page is scattered when its run is short
    scattered = index[np.repeat(short, lengths)]
    return starts[~short], lengths[~short], scattered


def deal_scattered(
    scattered: npt.NDArray[np.int64], channels: int
) -> list[list[npt.NDArray[np.int64]]]:
    """Deal scattered pages to ``channels`` channels as lists of consecutive pages (in
    page order, round-robin): a pass of a few hundred dirty pages still uses every
    channel, and no list is longer than :data:`MAX_SCATTER_PAGES`."""
    out: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(channels)]
    n = int(scattered.size)
    if not n:
        return out
    chunk = max(1, min(MAX_SCATTER_PAGES, -(-n // channels)))
    for k, a in enumerate(range(0, n, chunk)):
        out[k % channels].append(scattered[a : a + chunk])
    return out


@dataclass
class RunCounts:
    """Pages a channel sent in a pass."""

    normal: int = 0
    zero: int = 0
    wire_bytes: int = 0

    def add(self, other: RunCounts) -> None:
        self.normal += other.normal
        self.zero += other.zero
        self.wire_bytes += other.wire_bytes


def encode_runs(
    writer: ChannelWriter,
    ram: GuestRam,
    number: int,
    runs: list[tuple[int, int]],
    bounce: npt.NDArray[np.uint8],
    counts: RunCounts,
    *,
    batch_bytes: int,
    snapshot: bool = True,
    live: OwedReportReader | None = None,
) -> Iterator[list[Buffer]]:
    """The records for ``runs`` of pass ``number``, in batches of about ``batch_bytes``:
    all-zero pages (found with numpy) become ZERO records, the others PAGES records.

    With ``snapshot`` (the guest may be running) each run is copied into ``bounce`` and
    the copy is checksummed and sent: the bytes on the wire match their checksum even if
    the guest writes the page meanwhile (the write dirties it for the next pass).  The
    caller must send each batch before asking for the next: the bounce buffer is reused.
    Without ``snapshot`` the records view guest memory directly: the guest is paused,
    or (``live``: a peer of channel protocol 1.3, a pass that is not the final one) the
    records are marked LIVE and noted in ``live`` for the destination's OWED report."""
    if live is not None and snapshot:
        raise StreamUsageError("LIVE records are not snapshots")
    ps = ram.page_size
    batch: list[Buffer] = []
    size = used = 0
    wire0 = writer.bytes_out
    for first, count in runs:
        zero = ram.zero_mask(first, count)
        for is_zero, s, n in _pieces(zero, first):
            if is_zero:
                batch.append(writer.zero(number, s, n))
                counts.zero += n
                continue
            nbytes = n * ps
            if live is not None:
                batch += _live_records(writer, ram, number, s, n, live)
            elif snapshot:
                if used + nbytes > bounce.size:
                    yield batch
                    batch, size, used = [], 0, 0
                data = bounce[used : used + nbytes]
                np.copyto(data, ram.bytes[s * ps : s * ps + nbytes])
                used += nbytes
                batch += writer.pages(number, s, data.data)
            else:
                batch += writer.pages(number, s, ram.bytes[s * ps : s * ps + nbytes].data)
            counts.normal += n
            size += nbytes
            if size >= batch_bytes:
                yield batch
                batch, size, used = [], 0, 0
    if batch:
        yield batch
    counts.wire_bytes += writer.bytes_out - wire0


def _live_records(writer: ChannelWriter, ram: GuestRam, number: int, first: int, count: int,
                  live: OwedReportReader) -> list[Buffer]:  # fmt: skip
    """LIVE records of ``count`` pages of guest memory from ``first``, at most
    :data:`LIVE_RECORD_BYTES` each, every one noted for the destination's OWED report."""
    ps = ram.page_size
    step = max(1, LIVE_RECORD_BYTES // ps)
    out: list[Buffer] = []
    for a in range(first, first + count, step):
        k = min(step, first + count - a)
        live.sent_live(number, a, k)
        out += writer.pages(number, a, ram.bytes[a * ps : (a + k) * ps].data, live=True)
    return out


def encode_scatter(
    writer: ChannelWriter,
    ram: GuestRam,
    number: int,
    lists: list[npt.NDArray[np.int64]],
    bounce: npt.NDArray[np.uint8],
    counts: RunCounts,
    *,
    batch_bytes: int,
) -> Iterator[list[Buffer]]:
    """The SCATTER records for the page ``lists`` of pass ``number`` (each sorted), in
    batches of about ``batch_bytes``: the zero pages of a list in one ZEROED record, the
    others gathered (a snapshot, whether the guest runs or not: the pages are not
    contiguous) into ``bounce`` and sent in one record.  As for :func:`encode_runs`, each
    batch must be sent before the next is asked for."""
    ps = ram.page_size
    per_record = max(1, min(MAX_SCATTER_PAGES, MAX_RECORD_BYTES // ps, bounce.size // ps))
    batch: list[Buffer] = []
    size = used = 0
    wire0 = writer.bytes_out
    for pages in lists:
        for a in range(0, int(pages.size), per_record):
            chunk = pages[a : a + per_record]
            zero = ram.zero_mask_at(chunk)
            if zero.any():
                batch += writer.scatter(number, chunk[zero], None)
                counts.zero += int(zero.sum())
            live = chunk[~zero] if zero.any() else chunk
            if not live.size:
                continue
            nbytes = int(live.size) * ps
            if used + nbytes > bounce.size:
                yield batch
                batch, size, used = [], 0, 0
            snap = bounce[used : used + nbytes]
            ram.gather(live, snap.reshape(live.size, ps))
            used += nbytes
            batch += writer.scatter(number, live, snap.data)
            counts.normal += int(live.size)
            size += nbytes
            if size >= batch_bytes:
                yield batch
                batch, size, used = [], 0, 0
    if batch:
        yield batch
    counts.wire_bytes += writer.bytes_out - wire0


def _pieces(zero: npt.NDArray[np.bool_], first: int) -> list[tuple[bool, int, int]]:
    """Cut a run into maximal (is_zero, start, count) pieces."""
    if zero.all():
        return [(True, first, int(zero.size))]
    if not zero.any():
        return [(False, first, int(zero.size))]
    edges = np.flatnonzero(np.diff(zero.view(np.int8))) + 1
    bounds = [0, *edges.tolist(), int(zero.size)]
    return [(bool(zero[a]), first + a, b - a) for a, b in itertools.pairwise(bounds)]


class RamSink(Protocol):
    """Where RAM goes when it does not travel in the main stream: the host's parallel
    data channels (:mod:`vmferry.migration.multichannel`).  ``send_pass`` returns once
    every page of ``mask`` and each channel's SYNC of pass ``number`` were handed to the
    channels; it adds the bytes it sends to the session's ``channel_bytes`` as it goes."""

    def send_pass(self, number: int, mask: npt.NDArray[np.bool_], final: bool) -> RunCounts:
        ...

    def owed_pages(self, dirty: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """The next pass's pages, once the dirty log was read after a pass (the guest
        still running): ``dirty`` and the pages the destination reported owed (records
        of live guest memory that arrived torn; see
        :func:`vmferry.migration.owed.add_owed`, which also refuses a torn
        record none of whose pages is in ``dirty``)."""
        ...
