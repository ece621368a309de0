"""Torn LIVE records, sans-IO: the destination's owed pages and the source's side of the
OWED reports (channel protocol 1.3; the wire format and the rules are in
:mod:`vmferry.migration.multichannel`)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vmferry.errors import ChecksumMismatch, MalformedRecord, StreamUsageError
from vmferry.migration.multichannel import (
    HEAD,
    HEADER,
    HEADER_SIZE,
    MAX_OWED_RANGES,
    OWED_RANGE,
    ChannelRecord,
    checksum,
)
from vmferry.migration.runs import page_runs
from vmferry.migration.stream.records import Buffer


class OwedPages:
    """The destination's owed pages: those of LIVE records that arrived torn and that no
    verified record has covered since (see the module docstring).  Not thread-safe: the
    host serialises :meth:`owe` and the covering calls that may overlap owed pages."""

    def __init__(self, npages: int) -> None:
        self.mask: npt.NDArray[np.bool_] = np.zeros(npages, dtype=np.bool_)
        #: pages owed now
        self.count = 0
        #: pages that were ever owed (for the job's figures)
        self.total = 0

    def owe(self, first: int, count: int) -> None:
        seg = self.mask[first : first + count]
        new = count - int(np.count_nonzero(seg))
        self.count += new
        self.total += new
        seg[:] = True

    def covered(self, first: int, count: int) -> None:
        """A verified record stored pages ``[first, first + count)``."""
        if self.count:
            seg = self.mask[first : first + count]
            self.count -= int(np.count_nonzero(seg))
            seg[:] = False

    def covered_at(self, pages: npt.NDArray[np.int64]) -> None:
        """A verified SCATTER record stored ``pages``."""
        if self.count:
            self.count -= int(np.count_nonzero(self.mask[pages]))
            self.mask[pages] = False

    def check(self) -> None:
        """Every channel finished the final pass: ChecksumMismatch naming the pages still
        owed (their data never arrived verified), if any."""
        if not self.count:
            return
        starts, lengths = page_runs(np.flatnonzero(self.mask), self.mask.size)
        shown = ", ".join(f"[{s}, {s + n})" for s, n in zip(starts[:8].tolist(),
                                                             lengths[:8].tolist(), strict=True))
        more = f" and {starts.size - 8} more ranges" if starts.size > 8 else ""
        raise ChecksumMismatch(f"{self.count} pages of torn LIVE records never arrived "
                               f"verified: pages {shown}{more}")  # fmt: skip


class OwedReportReader:
    """The source's side of one channel's OWED reports: the LIVE records it sent in each
    pass (:meth:`sent_live`), and the checks of the report the destination sends after
    such a pass.  Read :data:`HEADER_SIZE` bytes, pass them to :meth:`header` (which
    returns how many bytes of ranges follow), then those to :meth:`ranges`."""

    def __init__(self, channel: int, npages: int, page_size: int) -> None:
        self.channel = channel
        self.npages = npages
        self.page_size = page_size
        #: the LIVE records (first, count) sent in each pass whose report is due
        self.sent: dict[int, set[tuple[int, int]]] = {}
        self._pending: tuple[bytes, int, int, int] | None = None

    def sent_live(self, number: int, first: int, count: int) -> None:
        self.sent.setdefault(number, set()).add((first, count))

    def due(self, number: int) -> bool:
        """Whether the destination owes a report for pass ``number``."""
        return number in self.sent

    def header(self, raw: Buffer) -> int:
        """An OWED report's header: the length of its ranges (MalformedRecord if it is
        not a report this channel awaits)."""
        if self._pending is not None:
            raise StreamUsageError("header() while a report's ranges are still expected")
        if memoryview(raw).nbytes != HEADER_SIZE:
            raise StreamUsageError(f"a channel header is {HEADER_SIZE} bytes")
        kind, flags, channel, number, first, count, page_size, claimed = HEADER.unpack(raw)
        number, count = int(number), int(count)
        where = f"data channel {self.channel}"
        if kind != ChannelRecord.OWED or flags or first or channel != self.channel \
                or page_size != self.page_size:  # fmt: skip
            raise MalformedRecord(f"{where}: the destination sent type {kind}, flags "
                                  f"{flags:#x}, channel {channel}, page size {page_size}; "
                                  "expected an OWED report")  # fmt: skip
        if not self.sent:
            raise MalformedRecord(f"{where}: an OWED report for pass {number}, and none "
                                  "is due")  # fmt: skip
        awaited = min(self.sent)
        if number != awaited:
            raise MalformedRecord(f"{where}: an OWED report for pass {number}; the one "
                                  f"due is pass {awaited}'s")  # fmt: skip
        most = min(len(self.sent[number]), MAX_OWED_RANGES)
        if count > most:
            raise MalformedRecord(f"{where}: an OWED report of {count} ranges for pass "
                                  f"{number}, which had {most} LIVE records here")
        self._pending = (bytes(raw[: HEAD.size]), claimed, number, count)
        return int(count) * OWED_RANGE.size

    def ranges(self, raw: Buffer) -> tuple[int, list[tuple[int, int]]]:
        """The report's ranges, checked: (pass, [(first, count), ...])."""
        if self._pending is None:
            raise StreamUsageError("ranges() without an OWED header")
        head, claimed, number, count = self._pending
        if memoryview(raw).nbytes != count * OWED_RANGE.size:
            raise StreamUsageError("ranges() of another length than the header's")
        self._pending = None
        where = f"data channel {self.channel}"
        if checksum(head, raw) != claimed:
            raise ChecksumMismatch(f"{where}: OWED report of pass {number} damaged")
        sent = self.sent.pop(number)
        out: list[tuple[int, int]] = []
        for first, n in OWED_RANGE.iter_unpack(raw):
            if not 0 < n <= self.npages or first > self.npages - n:
                raise MalformedRecord(f"{where}: owed pages [{first}, {first + n}) outside "
                                      f"guest RAM of {self.npages} pages")  # fmt: skip
            if (first, n) not in sent:
                raise MalformedRecord(f"{where}: owed pages [{first}, {first + n}) of pass "
                                      f"{number} are not a LIVE record sent here, or are "
                                      "named twice")  # fmt: skip
            sent.discard((first, n))
            out.append((first, n))
        return number, out


def add_owed(mask: npt.NDArray[np.bool_],
             owed: list[tuple[int, int, int]]) -> npt.NDArray[np.bool_]:  # fmt: skip
    """The pages of the next pass: ``mask`` (what the dirty log caught since the passes
    of ``owed``) with the owed ranges (pass, first, count) added.  Each range must hold
    a page of ``mask``: a torn record has a page the guest wrote after its checksum, which
    the dirty log caught; ChecksumMismatch if one has none (its data was damaged on the
    way, not torn)."""
    if not owed:
        return mask
    out = mask.copy()
    for number, first, count in owed:
        if not mask[first : first + count].any():
            raise ChecksumMismatch(f"pages [{first}, {first + count}) of pass {number} "
                                   "failed their checksum on the destination although the "
                                   "guest wrote none of them: damaged on the way")
        out[first : first + count] = True
    return out
