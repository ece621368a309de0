"""Sans-IO encoder and decoder for the stream format (see ``format.py``).

Encoder: each call returns the buffers to send, in order; large payloads (RAM runs,
device state) are passed through as views, never copied.

Decoder: bytes go in, records come out.  Two ways to give it bytes:

* ``feed(data)`` -- copy ``data`` in (simple; files, tests);
* ``writable()`` then ``wrote(n)`` -- receive straight into the decoder's buffer
  (``sock.recv_into(dec.writable())``), the zero-copy path for the data connection.
  ``need()`` says how many bytes complete the current unit, so a transport can ask for
  exactly that and never over-read past the end of the stream.

``next_event()`` returns a record or :data:`NEED_DATA`.  A record is returned only after
its header was validated (type, length limit) *before* its payload was accepted, and its
checksum verified over the whole payload; the first error is final: the decoder stays in
its error state and every later call re-raises it.  Payload views in returned records
(``RamPages.data``) stay valid only until the next call on the decoder.

The buffer grows with the bytes that actually arrive, never with what a length field
claims, so a hostile length costs nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import numpy as np
import xxhash

from vmferry.errors import (
    BadMagic,
    ChecksumMismatch,
    OversizedRecord,
    StreamDecodeError,
    StreamUsageError,
    TruncatedRecord,
    UnknownRecord,
    UnsupportedVersion,
)
from vmferry.migration.stream import format as fmt
from vmferry.migration.stream.format import RecordType
from vmferry.migration.stream.records import PARSERS, Buffer, End, Record


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA

_GROW_STEP = 4 * fmt.MIB


class StreamEncoder:
    """Turns records into stream bytes and keeps the running checksum."""

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_64()
        self._started = False
        self._ended = False
        self.bytes_out = 0
        self.records_out = 0

    def header(self) -> bytes:
        if self._started:
            raise StreamUsageError("stream header already written")
        self._started = True
        data = fmt.FILE_HEADER.pack(fmt.MAGIC, fmt.MAJOR, fmt.MINOR, 0)
        self._hash.update(data)
        self.bytes_out += len(data)
        return data

    def encode(self, record: Record) -> list[Buffer]:
        """The buffers for one record: header, payload parts, checksum."""
        if not self._started or self._ended:
            raise StreamUsageError("records go between the stream header and END")
        parts = record.parts()
        length = sum(len(p) for p in parts)
        limit = fmt.MAX_PAYLOAD[record.TYPE]
        if length > limit:
            raise StreamUsageError(f"{record.TYPE.name} payload {length} over limit {limit}")
        head = fmt.RECORD_HEADER.pack(record.TYPE, 0, length)
        self._hash.update(head)
        for p in parts:
            self._hash.update(p)
        trailer = fmt.CHECKSUM.pack(self._hash.intdigest())
        self._hash.update(trailer)
        self.bytes_out += length + fmt.RECORD_OVERHEAD
        self.records_out += 1
        if isinstance(record, End):
            self._ended = True
        return [head, *parts, trailer]

    def encode_all(self, records: Iterable[Record]) -> bytes:
        """Convenience for small streams and tests: header (if not yet) and records."""
        out = bytearray(b"" if self._started else self.header())
        for r in records:
            for part in self.encode(r):
                out += part
        return bytes(out)


class _Phase(enum.Enum):
    FILE_HEADER = 1
    RECORD_HEADER = 2
    BODY = 3
    DONE = 4
    ERROR = 5


class StreamDecoder:
    """Turns stream bytes into validated records (see the module docstring)."""

    def __init__(self) -> None:
        self._buf = np.empty(64 * 1024, dtype=np.uint8)
        self._start = 0  # first unconsumed byte
        self._end = 0  # one past the last received byte
        self._phase = _Phase.FILE_HEADER
        self._type = RecordType.INVALID
        self._length = 0
        self._hash = xxhash.xxh3_64()
        self._error: StreamDecodeError | None = None
        self.offset = 0  # stream offset of self._start
        self.version: tuple[int, int] | None = None
        self.records_in = 0

    # --- input -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    def need(self) -> int:
        """Bytes still missing to complete the current unit (0 once the stream ended)."""
        have = self._end - self._start
        if self._phase is _Phase.FILE_HEADER:
            return max(0, fmt.FILE_HEADER.size - have)
        if self._phase is _Phase.RECORD_HEADER:
            return max(0, fmt.RECORD_HEADER.size - have)
        if self._phase is _Phase.BODY:
            total = fmt.RECORD_HEADER.size + self._length + fmt.CHECKSUM.size
            return max(0, total - have)
        return 0

    def writable(self) -> memoryview:
        """A region to receive into: at most what completes the current unit."""
        self._raise_if_failed()
        want = min(max(self.need(), 1), _GROW_STEP)
        self._make_room(want)
        return self._buf[self._end : self._end + want].data

    def wrote(self, n: int) -> None:
        if n < 0 or self._end + n > self._buf.size:
            raise StreamUsageError(f"wrote({n}) beyond the region handed out")
        self._end += n

    def feed(self, data: Buffer) -> None:
        self._raise_if_failed()
        if self._phase is _Phase.DONE and len(data):
            self._fail(StreamDecodeError("data after the end of the stream", self.offset))
        view = memoryview(data).cast("B")
        self._make_room(len(view))
        self._buf[self._end : self._end + len(view)] = np.frombuffer(view, dtype=np.uint8)
        self._end += len(view)

    def eof(self) -> None:
        """The input ended: an error unless the stream ended cleanly."""
        self._raise_if_failed()
        if self._phase is not _Phase.DONE:
            self._fail(TruncatedRecord(f"stream ends early ({self._where()})", self.offset))

    def _make_room(self, want: int) -> None:
        if self._end + want <= self._buf.size:
            return
        live = self._end - self._start
        if live + want <= self._buf.size and self._start > 0:
            self._buf[:live] = self._buf[self._start : self._end].copy()
        else:
            grown = np.empty(max(live + want, 2 * live, 64 * 1024), dtype=np.uint8)
            grown[:live] = self._buf[self._start : self._end]
            self._buf = grown
        self._start, self._end = 0, live

    # --- output ----------------------------------------------------------------------

    def next_event(self) -> Record | _NeedData:
        self._raise_if_failed()
        try:
            return self._next()
        except StreamDecodeError as exc:
            self._fail(exc)
            raise

    def events(self) -> Iterable[Record]:
        """Every record decodable from the bytes given so far."""
        while (ev := self.next_event()) is not NEED_DATA:
            assert not isinstance(ev, _NeedData)
            yield ev

    def _next(self) -> Record | _NeedData:
        if self._phase is _Phase.FILE_HEADER and not self._file_header():
            return NEED_DATA
        if self._phase is _Phase.RECORD_HEADER and not self._record_header():
            return NEED_DATA
        if self._phase is _Phase.BODY:
            return self._body()
        if self._phase is _Phase.DONE and self._end > self._start:
            raise StreamDecodeError("data after the end of the stream", self.offset)
        return NEED_DATA

    def _file_header(self) -> bool:
        if self._end - self._start < fmt.FILE_HEADER.size:
            return False
        raw = self._buf[self._start : self._start + fmt.FILE_HEADER.size].tobytes()
        magic, major, minor, flags = fmt.FILE_HEADER.unpack(raw)
        if magic != fmt.MAGIC:
            raise BadMagic(f"not a vmferry stream (magic {magic!r})", 0)
        if major != fmt.MAJOR or minor > fmt.MINOR:
            raise UnsupportedVersion(
                f"stream version {major}.{minor}; this reader understands "
                f"{fmt.MAJOR}.0 to {fmt.MAJOR}.{fmt.MINOR}",
                8,
            )
        if flags:
            raise UnsupportedVersion(f"unknown stream flags {flags:#x}", 12)
        self.version = (major, minor)
        self._hash.update(raw)
        self._consume(fmt.FILE_HEADER.size)
        self._phase = _Phase.RECORD_HEADER
        return True

    def _record_header(self) -> bool:
        if self._end - self._start < fmt.RECORD_HEADER.size:
            return False
        raw = self._buf[self._start : self._start + fmt.RECORD_HEADER.size].tobytes()
        rtype, flags, length = fmt.RECORD_HEADER.unpack(raw)
        try:
            kind = RecordType(rtype)
        except ValueError:
            kind = RecordType.INVALID
        if kind is RecordType.INVALID:
            raise UnknownRecord(f"unknown record type {rtype}", self.offset)
        if flags:
            raise UnknownRecord(f"{kind.name} record has unknown flags {flags:#x}", self.offset)
        limit = fmt.MAX_PAYLOAD[kind]
        if length > limit:
            raise OversizedRecord(
                f"{kind.name} record of {length} bytes (limit {limit})", self.offset
            )
        exact = fmt.EXACT_PAYLOAD.get(kind)
        if exact is not None and length != exact:
            raise OversizedRecord(
                f"{kind.name} record of {length} bytes (must be {exact})", self.offset
            )
        self._type, self._length = kind, length
        self._phase = _Phase.BODY
        return True

    def _body(self) -> Record | _NeedData:
        total = fmt.RECORD_HEADER.size + self._length + fmt.CHECKSUM.size
        if self._end - self._start < total:
            return NEED_DATA
        rec = self._buf[self._start : self._start + total]
        body = rec[: total - fmt.CHECKSUM.size]
        self._hash.update(body.data)
        (claimed,) = fmt.CHECKSUM.unpack(rec[total - fmt.CHECKSUM.size :].tobytes())
        if claimed != self._hash.intdigest():
            raise ChecksumMismatch(f"{self._type.name} record checksum mismatch", self.offset)
        self._hash.update(rec[total - fmt.CHECKSUM.size :].data)
        payload = body.data[fmt.RECORD_HEADER.size :]
        record = PARSERS[self._type](payload)
        self._consume(total)
        self.records_in += 1
        self._phase = _Phase.DONE if self._type is RecordType.END else _Phase.RECORD_HEADER
        return record

    def _consume(self, n: int) -> None:
        self._start += n
        self.offset += n
        if self._start == self._end:
            self._start = self._end = 0

    # --- errors ----------------------------------------------------------------------

    def _where(self) -> str:
        if self._phase is _Phase.BODY:
            return f"inside a {self._type.name} record of {self._length} bytes"
        return f"in the {self._phase.name.lower().replace('_', ' ')}"

    def _fail(self, exc: StreamDecodeError) -> None:
        self._error = exc
        self._phase = _Phase.ERROR
        raise exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
