"""Parallel data channels for guest RAM, sans-IO: the wire format, the writer, the reader.

With ``parallel = N`` a migration moves guest RAM over N data connections beside the
main one (which keeps the VM configuration, device state, vCPUs and END).  Each channel
carries a sequence of records, each a fixed 32-byte header, for page data followed by
the pages themselves::

    +---------+----------+-------------+----------+--------------+------------+----------------+
    | type u8 | flags u8 | channel u16 | pass u32 | first u64    | count u32  | page_size u32  |
    +---------+----------+-------------+----------+--------------+------------+----------------+
    | checksum u64: xxh3-64 of the 24 bytes before it and the payload   |  payload (PAGES only)
    +-------------------------------------------------------------------+

All integers are big-endian.  Types:

* ``PAGES`` -- ``count`` pages from page ``first``; ``count * page_size`` bytes follow;
* ``ZERO`` -- ``count`` pages from page ``first`` read as zero (no payload);
* ``SYNC`` -- this channel has sent everything of pass ``pass``; flag ``FINAL`` marks
  the last pass: nothing follows on the channel;
* ``SCATTER`` -- ``count`` pages at scattered page numbers (``first`` is 0): ``count``
  page numbers follow (u64 each, strictly increasing), then ``count * page_size`` bytes
  of their data, in the same order -- or nothing more with flag ``ZEROED``: the listed
  pages read as zero.  The checksum covers the header, the page list and the data.  At
  most :data:`MAX_SCATTER_PAGES` pages (and :data:`MAX_RECORD_BYTES` of data) a record.

Dirty passes and the final pass mostly move pages that do not touch each other (a hot
working set): one record per page would cost a header, a checksum and a system call per
page; SCATTER records carry them a list at a time, as the main stream's RAM_SCATTER does.

``DEVICE`` (type 5, channel protocol 1.2) carries one chunk of a device's stop-copy
state: ``first`` is the chunk's index in the migration's stop-copy device data (0, 1,
2, ... across all devices, in the order the source read them), ``count`` the payload's
length; the payload is ``id length u8 | phase u8 | reserved u16 | seq u32 | device id |
data``.  The chunks are dealt round-robin to the channels of the final pass (before each
channel's final SYNC); the destination puts them back in index order
(:class:`DeviceReassembler`) and loads each device's chunks strictly in sequence, as
QEMU's multifd device-state transfer does.

**Live pages and OWED reports (channel protocol 1.3).**  Between two peers of channel
protocol 1.3 the source may send a PAGES record straight from guest memory, without a
snapshot, in a pass that is not the final one: flag ``LIVE`` (0x04) marks it, and 8
bytes follow its header before the pages -- the xxh3-64 of the header's first 24 bytes
alone, so that a damaged header (a wrong page number would leave the pages it should have
named stale, unnoticed) still fails at once, whatever becomes of the pages.  The
running guest may write one of its pages between the checksum and the kernel's copy: the
record then arrives *torn*, its checksum fails, and its written page is dirty in the
dirty log (tracking started before the pass), so a later pass sends it again.  The
record's other pages are unverified meanwhile.  So the destination, on a checksum
mismatch of a LIVE record, keeps the data and records the record's page range as
*owed* (:class:`~vmferry.migration.owed.OwedPages`); a page stops being owed when a
later verified record (PAGES without ``LIVE``, SCATTER, ZERO, or a LIVE record that
matches) covers it.  After the ``SYNC(k)`` of a pass in which a channel carried LIVE
records, the destination answers on that channel, towards the source, with one report::

    OWED (type 6, flags 0, pass k, first 0, count n): n ranges follow,
    each first u64 | count u64 -- a LIVE record of pass k on this channel that arrived torn

checksummed as every record (header and ranges).  ``n`` may be 0, and is at most the
number of LIVE records the channel carried in pass ``k`` (and
:data:`MAX_OWED_RANGES`).  The source
(:class:`~vmferry.migration.owed.OwedReportReader`) waits for the report of each such
pass before it starts the next (so it has every report before it stops the guest),
refuses one for a pass it did not mark, or naming a range that is not a LIVE record it
sent there, and adds the owed ranges to the next pass's pages when it reads the dirty
log (:func:`~vmferry.migration.owed.add_owed`) -- after checking that each range holds a
page the guest wrote meanwhile: a torn record without one was damaged on the way, and
fails the migration.  On the destination, a LIVE record in the final pass is a
MalformedRecord, and any page still owed when every channel has finished the final pass
fails the migration with a ChecksumMismatch naming the pages.  How many records tore is
not a failure: a guest that writes everywhere during pass 1 tears many (each costs its
pages once more in the next pass), and a record damaged on the way is caught by the
source's dirty-page check or, resent, by the checksum of the verified copy.  A peer of
an earlier minor version sends and accepts neither.

**Ordering: a page's newer copy always wins.**  Within a channel TCP keeps the order.
Across channels the destination keeps a barrier per pass: a channel's reader that meets
``SYNC(k)`` applies nothing of pass ``k + 1`` until every channel has delivered its
``SYNC(k)``.  A page sent in pass ``k`` and again in pass ``k + 1`` therefore lands in its
pass-``k + 1`` version whichever channels carried the two copies.  Every record names its
pass, and the reader refuses one from another pass than the current.

**Checksums.**  The header's checksum covers the header fields and the payload, so a
damaged page number is caught as surely as damaged data.  The receiver takes page data
straight into guest memory (``recv_into`` a view of the page run) and verifies it there,
before the pass's barrier: a migration whose checksum fails is abandoned before COMMIT,
and the staging VM with it.  xxh3 and ``recv_into`` release the GIL on large buffers, so
N receiving threads do run side by side.

A channel opens with a 44-byte hello (:func:`channel_hello`): the magic
``VMFCHAN\\x01``, the migration's one-time token (32 ASCII bytes), the channel's index and
the number of channels (u16 each).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.errors import ChecksumMismatch, MalformedRecord, StreamUsageError
from vmferry.machine.handlers import DeviceData, DevicePhase
from vmferry.migration.stream.records import Buffer

HEAD = struct.Struct(">BBHIQII")
#: one range of an OWED report: first page, page count
OWED_RANGE = struct.Struct(">QQ")
HEADER = struct.Struct(">BBHIQIIQ")
HEADER_SIZE = HEADER.size  # 32
#: flag of SYNC: the last pass, nothing follows
FINAL = 0x01
#: the most bytes of page data one PAGES record carries
MAX_RECORD_BYTES = 16 * 1024 * 1024
#: the most channels a migration opens
MAX_CHANNELS = 16
#: flag of SCATTER: the listed pages are all zero, no page data follows
ZEROED = 0x02
#: the most pages one SCATTER record lists
MAX_SCATTER_PAGES = 4096
#: runs shorter than this many pages travel in SCATTER lists rather than one record each
SCATTER_BELOW = 16
#: flag of PAGES (channel protocol 1.3): the data was checksummed in live guest memory,
#: not a snapshot; a mismatch makes its pages owed rather than failing the migration
LIVE = 0x04
#: bytes between a LIVE record's header and its pages: the header's own checksum
LIVE_CHECK_SIZE = 8
#: the most ranges one OWED report lists
MAX_OWED_RANGES = 65536
#: the most pages one LIVE record carries (1 MiB of 4 KiB pages): a torn record costs
#: its pages again, and the chance that the guest writes one of them between the
#: checksum and the send grows with the record's size squared (a 4 MiB record tore in
#: one of eight at 40 MB/s of guest writes here)
LIVE_RECORD_BYTES = 1024 * 1024


DEVICE_HEAD = struct.Struct(">BBHI")  # id length, phase, reserved, seq; then id, data
#: the most bytes one DEVICE record carries (a chunk of at most 16 MiB and its header)
MAX_DEVICE_RECORD = DEVICE_HEAD.size + 255 + MAX_RECORD_BYTES

HELLO = struct.Struct(">8s32sHH")
HELLO_MAGIC = b"VMFCHAN\x01"


def channel_hello(token: str, index: int, count: int) -> bytes:
    """The first bytes of data channel ``index`` of ``count``."""
    raw = token.encode("ascii")
    if len(raw) != 32 or not 0 <= index < count <= MAX_CHANNELS:
        raise StreamUsageError("a channel hello takes a 32-character token and an index "
                               f"below a count of at most {MAX_CHANNELS}")
    return HELLO.pack(HELLO_MAGIC, raw, index, count)


def parse_channel_hello(raw: Buffer) -> tuple[str, int, int]:
    """(token, index, count) of a channel hello; MalformedRecord if it is not one."""
    if memoryview(raw).nbytes != HELLO.size:
        raise MalformedRecord(f"a channel hello is {HELLO.size} bytes")
    magic, token, index, count = HELLO.unpack(raw)
    if magic != HELLO_MAGIC:
        raise MalformedRecord("not a vmferry data channel")
    if not 0 <= index < count <= MAX_CHANNELS:
        raise MalformedRecord(f"data channel {index} of {count} (at most {MAX_CHANNELS})")
    try:
        return token.decode("ascii"), index, count
    except UnicodeDecodeError:
        raise MalformedRecord("channel hello token is not ASCII") from None


class ChannelRecord(enum.IntEnum):
    PAGES = 1
    ZERO = 2
    SYNC = 3
    SCATTER = 4
    DEVICE = 5
    OWED = 6  # destination -> source (channel protocol 1.3)

#: the flags each record type may carry
ALLOWED_FLAGS = {ChannelRecord.PAGES: LIVE, ChannelRecord.ZERO: 0, ChannelRecord.SYNC: FINAL,
                 ChannelRecord.SCATTER: ZEROED, ChannelRecord.DEVICE: 0,
                 ChannelRecord.OWED: 0}


@dataclass(frozen=True)
class Pages:
    """Page data follows: receive ``count`` pages into guest memory at page ``first``,
    then hand them to :meth:`ChannelReader.payload`.  For a ``live`` record the
    header's own checksum comes first: receive :data:`LIVE_CHECK_SIZE` bytes and hand
    them to :meth:`ChannelReader.live_check` before the pages."""

    first: int
    count: int
    #: a LIVE record: :meth:`ChannelReader.payload` may find it torn
    live: bool = False


@dataclass(frozen=True)
class Zero:
    first: int
    count: int


@dataclass(frozen=True)
class Sync:
    number: int
    final: bool


@dataclass(frozen=True)
class Scatter:
    """A page list follows (``count`` u64): receive it and hand it to
    :meth:`ChannelReader.scatter_index`; unless ``zero``, the pages' data follows then:
    receive it into a staging buffer, hand it to :meth:`ChannelReader.payload`, and only
    then store it into the listed pages."""

    count: int
    zero: bool




@dataclass(frozen=True)
class Device:
    """A device chunk follows: receive ``length`` bytes and hand them to
    :meth:`ChannelReader.device_payload`."""

    index: int
    length: int


ChannelEvent = Pages | Zero | Sync | Scatter | Device


def checksum(head: Buffer, *payload: Buffer | None) -> int:
    h = xxhash.xxh3_64(head)
    for part in payload:
        if part is not None:
            h.update(part)
    return h.intdigest()


class ChannelWriter:
    """The records of one channel, as buffers to send in order."""

    def __init__(self, channel: int, page_size: int) -> None:
        if not 0 <= channel < MAX_CHANNELS:
            raise StreamUsageError(f"channel {channel} outside [0, {MAX_CHANNELS})")
        self.channel = channel
        self.page_size = page_size
        self.bytes_out = 0
        self.finished = False
        #: SCATTER records written
        self.scatter_records = 0

    def _head(self, kind: ChannelRecord, flags: int, number: int, first: int, count: int,
              *payload: Buffer | None) -> bytes:  # fmt: skip
        if self.finished:
            raise StreamUsageError(f"channel {self.channel}: records after the final SYNC")
        head = HEAD.pack(kind, flags, self.channel, number, first, count, self.page_size)
        out = head + checksum(head, *payload).to_bytes(8, "big")
        self.bytes_out += len(out) + sum(memoryview(p).nbytes for p in payload
                                         if p is not None)  # fmt: skip
        return out

    def pages(self, number: int, first: int, data: Buffer, *, live: bool = False
              ) -> list[Buffer]:  # fmt: skip
        """A PAGES record: ``data`` (whole pages) is checksummed now and must not change
        until it has been sent (the sender passes a snapshot, or guest memory the guest
        cannot write: it is paused) -- or, with ``live`` (a peer of channel protocol
        1.3, not the final pass), live guest memory: the record is marked LIVE and may
        arrive torn (see the module docstring)."""
        n = memoryview(data).nbytes
        if n == 0 or n % self.page_size or n > MAX_RECORD_BYTES:
            raise StreamUsageError(f"PAGES of {n} bytes (whole pages, at most "
                                   f"{MAX_RECORD_BYTES})")
        if not live:
            return [self._head(ChannelRecord.PAGES, 0, number, first, n // self.page_size,
                               data), data]  # fmt: skip
        head = self._head(ChannelRecord.PAGES, LIVE, number, first, n // self.page_size, data)
        self.bytes_out += LIVE_CHECK_SIZE
        return [head, checksum(head[: HEAD.size]).to_bytes(LIVE_CHECK_SIZE, "big"), data]

    def zero(self, number: int, first: int, count: int) -> bytes:
        return self._head(ChannelRecord.ZERO, 0, number, first, count)

    def scatter(self, number: int, pages: npt.NDArray[np.int64], data: Buffer | None
                ) -> list[Buffer]:  # fmt: skip
        """A SCATTER record: ``pages`` (strictly increasing) with ``data`` (their pages in
        that order; a snapshot, as for :meth:`pages`), or read as zero (``data`` None)."""
        n = int(pages.size)
        if not 0 < n <= MAX_SCATTER_PAGES:
            raise StreamUsageError(f"SCATTER of {n} pages (1 to {MAX_SCATTER_PAGES})")
        if n > 1 and not bool((np.diff(pages) > 0).all()):
            raise StreamUsageError("SCATTER page numbers must be strictly increasing")
        index = pages.astype(">u8").tobytes()
        self.scatter_records += 1
        if data is None:
            return [self._head(ChannelRecord.SCATTER, ZEROED, number, 0, n, index), index]
        size = memoryview(data).nbytes
        if size != n * self.page_size or size > MAX_RECORD_BYTES:
            raise StreamUsageError(f"SCATTER of {n} pages with {size} bytes of data "
                                   f"(at most {MAX_RECORD_BYTES})")
        return [self._head(ChannelRecord.SCATTER, 0, number, 0, n, index, data), index, data]

    def device(self, number: int, index: int, piece: DeviceData) -> list[Buffer]:
        """A DEVICE record: chunk ``index`` of the stop-copy device data (``piece.data``
        is checksummed now and not copied: it must not change until it has been sent)."""
        ident = piece.device.encode()
        data = memoryview(piece.data).cast("B")
        if not 0 < len(ident) <= 255 or data.nbytes > MAX_RECORD_BYTES:
            raise StreamUsageError(f"device chunk of {piece.device!r}: an id of 1..255 "
                                   f"bytes and at most {MAX_RECORD_BYTES} bytes of data")
        body = DEVICE_HEAD.pack(len(ident), piece.phase, 0, piece.seq) + ident
        head = self._head(ChannelRecord.DEVICE, 0, number, index, len(body) + data.nbytes,
                          body, data)  # fmt: skip
        return [head + body, data]

    def sync(self, number: int, *, final: bool = False) -> bytes:
        out = self._head(ChannelRecord.SYNC, FINAL if final else 0, number, 0, 0)
        self.finished = final
        return out


class ChannelReader:
    """Validates one channel's records (see the module docstring).

    The host reads :data:`HEADER_SIZE` bytes and passes them to :meth:`header`; for a
    :class:`Pages` event it receives the page data (into guest memory) and passes it to
    :meth:`payload` before the next header.  For a :class:`Sync` it waits at the pass
    barrier with the other channels.  The first error is final."""

    def __init__(self, channel: int, npages: int, page_size: int, first_pass: int = 1,
                 *, live: bool = False) -> None:  # fmt: skip
        self.channel = channel
        #: LIVE records allowed (the source speaks channel protocol 1.3)
        self.live = live
        #: LIVE records of the current pass, and those of them that arrived torn
        self.live_records = 0
        self.torn: list[tuple[int, int]] = []
        #: the OWED report due after the last SYNC (None: none is due)
        self.report: bytes | None = None
        #: a LIVE record whose header check is still expected
        self._live_head: bytes | None = None
        self.npages = npages
        self.page_size = page_size
        self.current_pass = first_pass
        self.finished = False
        self.pages_received = 0
        self.zero_pages_received = 0
        self.bytes_in = 0
        self._pending: tuple[bytes, int, Pages] | None = None
        #: a SCATTER record whose page list (then data) is expected
        self._scatter: tuple[bytes, int, Scatter] | None = None
        self._scatter_data: tuple[xxhash.xxh3_64, int, int] | None = None
        self.device_chunks = 0
        self._device_pending: tuple[bytes, int, Device] | None = None

    def header(self, raw: Buffer) -> ChannelEvent:
        if self._pending is not None or self._scatter is not None or self._scatter_data \
                or self._device_pending is not None or self._live_head is not None:  # fmt: skip
            raise StreamUsageError("header() while a payload is still expected")
        if self.finished:
            raise MalformedRecord(f"channel {self.channel}: data after the final SYNC")
        if memoryview(raw).nbytes != HEADER_SIZE:
            raise StreamUsageError(f"a channel header is {HEADER_SIZE} bytes")
        head = bytes(raw[:HEAD.size])
        kind, flags, channel, number, first, count, page_size, claimed = HEADER.unpack(raw)
        where = f"channel {self.channel}"
        try:
            rtype = ChannelRecord(kind)
        except ValueError:
            raise MalformedRecord(f"{where}: unknown record type {kind}") from None
        if channel != self.channel:
            raise MalformedRecord(f"{where}: record says channel {channel}")
        if page_size != self.page_size:
            raise MalformedRecord(f"{where}: page size {page_size}, the VM uses "
                                  f"{self.page_size}")
        if number != self.current_pass:
            raise MalformedRecord(f"{where}: a record of pass {number} during pass "
                                  f"{self.current_pass}")
        if flags & ~ALLOWED_FLAGS[rtype]:
            raise MalformedRecord(f"{where}: {rtype.name} with unknown flags {flags:#x}")
        if rtype is ChannelRecord.OWED:
            raise MalformedRecord(f"{where}: an OWED report from the source")
        if flags & LIVE and not self.live:
            raise MalformedRecord(f"{where}: a LIVE PAGES record from a source that did not "
                                  "negotiate them (channel protocol 1.3)")  # fmt: skip
        self.bytes_in += HEADER_SIZE
        if rtype is ChannelRecord.SYNC:
            if first or count:
                raise MalformedRecord(f"{where}: SYNC with pages")
            self._verify(claimed, head, None, "SYNC")
            final = bool(flags & FINAL)
            if final and self.live_records:
                raise MalformedRecord(f"{where}: {self.live_records} LIVE records in the "
                                      f"final pass {number} (the guest is paused: it sends "
                                      "none)")  # fmt: skip
            self.report = None
            if self.live_records:
                self.report = owed_report(self.channel, number, self.page_size, self.torn)
            self.live_records, self.torn = 0, []
            self.finished = final
            self.current_pass += 0 if final else 1
            return Sync(number, final)
        if rtype is ChannelRecord.SCATTER:
            return self._scatter_header(head, claimed, flags, first, count)
        if rtype is ChannelRecord.DEVICE:
            return self._device_header(head, claimed, first, count)
        if count == 0 or first + count > self.npages:
            raise MalformedRecord(f"{where}: pages [{first}, {first + count}) outside guest "
                                  f"RAM of {self.npages} pages")
        if rtype is ChannelRecord.ZERO:
            self._verify(claimed, head, None, "RAM_ZERO")
            self.zero_pages_received += count
            return Zero(first, count)
        if count * self.page_size > MAX_RECORD_BYTES:
            raise MalformedRecord(f"{where}: PAGES of {count} pages is over the "
                                  f"{MAX_RECORD_BYTES}-byte limit")
        live = bool(flags & LIVE)
        self.live_records += live
        event = Pages(first, count, live)
        self._pending = (head, claimed, event)
        if live:
            self._live_head = head
        return event

    def live_check(self, raw: Buffer) -> None:
        """The header check of the last (LIVE) :class:`Pages` event, as received:
        ChecksumMismatch if the header is damaged."""
        if self._live_head is None:
            raise StreamUsageError("live_check() without a LIVE PAGES header")
        if memoryview(raw).nbytes != LIVE_CHECK_SIZE:
            raise StreamUsageError(f"a LIVE record's header check is {LIVE_CHECK_SIZE} bytes")
        head, self._live_head = self._live_head, None
        self.bytes_in += LIVE_CHECK_SIZE
        if checksum(head).to_bytes(LIVE_CHECK_SIZE, "big") != bytes(raw):
            raise ChecksumMismatch(f"channel {self.channel}: LIVE PAGES header checksum "
                                   f"mismatch (pass {self.current_pass})")  # fmt: skip

    def _scatter_header(self, head: bytes, claimed: int, flags: int, first: int, count: int
                        ) -> Scatter:  # fmt: skip
        where = f"channel {self.channel}"
        zero = bool(flags & ZEROED)
        if first != 0:
            raise MalformedRecord(f"{where}: SCATTER with a first page ({first})")
        if not 0 < count <= MAX_SCATTER_PAGES:
            raise MalformedRecord(f"{where}: SCATTER of {count} pages (1 to "
                                  f"{MAX_SCATTER_PAGES})")
        if not zero and count * self.page_size > MAX_RECORD_BYTES:
            raise MalformedRecord(f"{where}: SCATTER of {count} pages is over the "
                                  f"{MAX_RECORD_BYTES}-byte limit")
        event = Scatter(count, zero)
        self._scatter = (head, claimed, event)
        return event

    def scatter_index(self, raw: Buffer) -> npt.NDArray[np.int64]:
        """The page list of the last :class:`Scatter` event (``8 * count`` bytes, as
        received), checked: strictly increasing, inside guest RAM.  For a zeroed list the
        record is complete (and its checksum verified) here; otherwise its data follows
        (:meth:`payload`)."""
        if self._scatter is None:
            raise StreamUsageError("scatter_index() without a SCATTER header")
        head, claimed, event = self._scatter
        if memoryview(raw).nbytes != 8 * event.count:
            raise StreamUsageError("scatter_index() of another length than the header's")
        self._scatter = None
        where = f"channel {self.channel}"
        wide = np.frombuffer(raw, ">u8", event.count)
        if int(wide.max()) >= self.npages:  # checked as u64: no wrap to a negative index
            raise MalformedRecord(f"{where}: SCATTER lists a page outside guest RAM of "
                                  f"{self.npages} pages")
        pages = wide.astype(np.int64)
        if pages.size > 1 and not bool((np.diff(pages) > 0).all()):
            raise MalformedRecord(f"{where}: SCATTER page numbers are not strictly "
                                  "increasing")
        self.bytes_in += 8 * event.count
        if event.zero:
            self._verify(claimed, head, raw, "SCATTER (zero)")
            self.zero_pages_received += event.count
            return pages
        h = xxhash.xxh3_64(head)
        h.update(raw)
        self._scatter_data = (h, claimed, event.count)
        return pages

    def payload(self, data: Buffer) -> bool:
        """The page data of the last :class:`Pages` event, or of the last page list of
        a :class:`Scatter` event, as received (ChecksumMismatch if it is not what was
        sent).  False: a LIVE record arrived torn -- its pages are owed (the caller keeps
        the data and records them, :class:`~vmferry.migration.owed.OwedPages`); True: verified."""
        if self._scatter_data is not None:
            h, claimed, count = self._scatter_data
            if memoryview(data).nbytes != count * self.page_size:
                raise StreamUsageError("payload() of another length than the header's")
            self._scatter_data = None
            h.update(data)
            if h.intdigest() != claimed:
                raise ChecksumMismatch(f"SCATTER record checksum mismatch (pass "
                                       f"{self.current_pass})")
            self.pages_received += count
            self.bytes_in += count * self.page_size
            return True
        if self._pending is None:
            raise StreamUsageError("payload() without a PAGES header")
        if self._live_head is not None:
            raise StreamUsageError("payload() of a LIVE record before its live_check()")
        head, claimed, event = self._pending
        if memoryview(data).nbytes != event.count * self.page_size:
            raise StreamUsageError("payload() of another length than the header's")
        self._pending = None
        verified = True
        if not event.live:
            self._verify(claimed, head, data, "RAM_PAGES")
        elif checksum(head, data) != claimed:
            verified = False
            self.torn.append((event.first, event.count))
        self.pages_received += event.count
        self.bytes_in += event.count * self.page_size
        return verified

    def _device_header(self, head: bytes, claimed: int, index: int, length: int) -> Device:
        if not DEVICE_HEAD.size < length <= MAX_DEVICE_RECORD:
            raise MalformedRecord(f"channel {self.channel}: DEVICE record of {length} bytes "
                                  f"(at most {MAX_DEVICE_RECORD})")
        event = Device(index, length)
        self._device_pending = (head, claimed, event)
        return event

    def device_payload(self, data: Buffer) -> tuple[int, DeviceData]:
        """The payload of the last :class:`Device` event, as received: (index, chunk);
        ChecksumMismatch if it is not what was sent, MalformedRecord if it does not
        parse or is not stop-copy data.  The chunk's data is a view of ``data``."""
        if self._device_pending is None:
            raise StreamUsageError("device_payload() without a DEVICE header")
        head, claimed, event = self._device_pending
        view = memoryview(data).cast("B")
        if view.nbytes != event.length:
            raise StreamUsageError("device_payload() of another length than the header's")
        self._device_pending = None
        self._verify(claimed, head, view, f"DEVICE #{event.index}")
        where = f"channel {self.channel}: DEVICE record #{event.index}"
        id_len, phase, reserved, seq = DEVICE_HEAD.unpack_from(view)
        start = DEVICE_HEAD.size + id_len
        if reserved or id_len == 0 or view.nbytes < start:
            raise MalformedRecord(f"{where} has an inconsistent header")
        try:
            ph = DevicePhase(phase)
            ident = bytes(view[DEVICE_HEAD.size : start]).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedRecord(f"{where}: {exc}") from exc
        if ph not in (DevicePhase.STOP_COPY, DevicePhase.DONE):
            raise MalformedRecord(f"{where} of phase {ph.name}: only stop-copy device data "
                                  "travels on the channels")  # fmt: skip
        self.device_chunks += 1
        self.bytes_in += HEADER_SIZE + event.length
        return event.index, DeviceData(ident, ph, seq, view[start:])

    def _verify(self, claimed: int, head: bytes, payload: Buffer | None, what: str) -> None:
        if checksum(head, payload) != claimed:
            raise ChecksumMismatch(f"{what} record checksum mismatch (pass "
                                   f"{self.current_pass})")


# --- torn LIVE records: owed pages and the OWED reports ---------------------------------------


def owed_report(channel: int, number: int, page_size: int,
                ranges: list[tuple[int, int]]) -> bytes:  # fmt: skip
    """The destination's OWED report of pass ``number`` on ``channel``: the ``ranges``
    (first, count) of the LIVE records that arrived torn there."""
    if len(ranges) > MAX_OWED_RANGES:
        raise StreamUsageError(f"an OWED report of {len(ranges)} ranges (at most "
                               f"{MAX_OWED_RANGES})")  # fmt: skip
    body = b"".join(OWED_RANGE.pack(first, count) for first, count in ranges)
    head = HEAD.pack(ChannelRecord.OWED, 0, channel, number, 0, len(ranges), page_size)
    return head + checksum(head, body).to_bytes(8, "big") + body


# --- device state over the channels (stop-copy) --------------------------------------------



def device_records(writer: ChannelWriter, number: int,
                   pieces: list[tuple[int, DeviceData]]) -> list[Buffer]:  # fmt: skip
    """The DEVICE records of ``pieces`` (index, chunk) for channel ``writer``, in pass
    ``number``.  The chunk data is not copied (the device is stopped: its stop-copy data
    does not change until the session ends)."""
    out: list[Buffer] = []
    for index, piece in pieces:
        out += writer.device(number, index, piece)
    return out


def deal_device(pieces: list[DeviceData], channels: int) -> list[list[tuple[int, DeviceData]]]:
    """Number the stop-copy device chunks in read order and deal them round-robin."""
    out: list[list[tuple[int, DeviceData]]] = [[] for _ in range(channels)]
    for index, piece in enumerate(pieces):
        out[index % channels].append((index, piece))
    return out


class DeviceReassembler:
    """The destination's side of DEVICE records: chunks arrive on any channel in any
    order; :meth:`offer` returns the ones that are next in index order (each device's
    chunks are then in sequence order too, as the source read them).  A duplicate or
    stale index is a MalformedRecord, and so is holding more than ``max_queued`` bytes
    out of order; :meth:`check_complete` fails if a gap remains once every channel
    finished."""

    def __init__(self, max_queued: int = 256 * 1024 * 1024) -> None:
        self.next_index = 0
        self.queued: dict[int, DeviceData] = {}
        self.queued_bytes = 0
        self.max_queued = max_queued

    def offer(self, index: int, piece: DeviceData) -> list[DeviceData]:
        if index < self.next_index or index in self.queued:
            raise MalformedRecord(f"device chunk #{index} arrived twice")
        n = memoryview(piece.data).nbytes
        if self.queued_bytes + n > self.max_queued:
            raise MalformedRecord(f"more than {self.max_queued} bytes of device chunks "
                                  f"wait for chunk #{self.next_index}")  # fmt: skip
        self.queued[index] = piece
        self.queued_bytes += n
        ready: list[DeviceData] = []
        while self.next_index in self.queued:
            p = self.queued.pop(self.next_index)
            self.queued_bytes -= memoryview(p.data).nbytes
            ready.append(p)
            self.next_index += 1
        return ready

    def check_complete(self) -> None:
        if self.queued:
            raise MalformedRecord(f"device chunk #{self.next_index} never arrived (chunks "
                                  f"{sorted(self.queued)[:5]} wait for it)")  # fmt: skip
