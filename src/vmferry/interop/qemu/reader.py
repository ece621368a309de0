"""Read a whole QEMU migration stream (``QEVM`` version 3, as QEMU 7.2 writes it).

Theory of operation
-------------------
:func:`read_stream` takes the stream as one bytes-like object (a ``bytes``, or an
``mmap`` of the file: nothing is copied) and walks it front to back, accounting for every
byte.  It first looks for the JSON VM description at the very end (``0x06 | u32 len |
JSON`` after ``QEMU_VM_EOF``), because that is what says how the device sections before
it are laid out.  Then, in stream order:

* the configuration section (machine name, target-page-bits, capabilities, uuid);
* ``ram``: the block list (``MEM_SIZE``), then page records -- zero pages (one fill byte),
  raw pages (one target page), XBZRLE and compressed pages (length-prefixed), each
  ``CONTINUE``-flagged record reusing the previous block -- up to ``EOS``.  Runs of equal
  records are checked with numpy over strided views of the headers, never touching the
  page bodies, so the cost is the header bytes, not the RAM;
* ``spapr/htab``: the HPT size, then chunks of hashed page table entries;
* every other FULL section through the description (:mod:`.vmstate`);
* anything else (a section QEMU's description does not cover) is skipped to its footer
  and reported as ``opaque``;
* each piece ends with the section footer ``0x7e | u32 section_id``, which is checked.

Every problem is one typed :class:`~vmferry.errors.StreamDecodeError` naming the byte
offset and what was expected there.  Lengths read from the stream are bounded by the bytes
that are left, so a hostile length costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from vmferry.errors import (
    BadMagic,
    MalformedRecord,
    OversizedRecord,
    StreamDecodeError,
    TruncatedRecord,
    UnknownRecord,
    UnsupportedVersion,
)
from vmferry.interop.qemu.format import (
    DEFAULT_PAGE_SIZE,
    ENCODING_FLAG_XBZRLE,
    HPTE_SIZE,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    SECTION_FOOTER,
    SUBSECTION,
    U32,
    Cursor,
    RamFlag,
    SectionType,
)
from vmferry.interop.qemu.model import HtabSummary, QemuStream, RamBlock, RamSummary, Section
from vmferry.interop.qemu.payloads import extract_payloads
from vmferry.interop.qemu.vmstate import walk_device

MAGIC_BYTES = b"QEVM"
_PAGE_KINDS = RamFlag.ZERO | RamFlag.PAGE | RamFlag.XBZRLE | RamFlag.COMPRESS_PAGE
_U64_MASK = (1 << 64) - 1
#: records of one kind seen in a row before the vectorised run check takes over
_RUN_AFTER = 4
_RUN_CHUNK_MAX = 1 << 16


def is_qemu_stream(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) opens a QEMU stream."""
    return head[:4] == MAGIC_BYTES


def read_stream(data: Any, *, payloads: bool = True) -> QemuStream:
    """Decode a whole QEMU stream; StreamDecodeError (with the offset) on anything wrong."""
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    stream = _Reader(buf).run()
    if payloads:
        extract_payloads(buf, stream)
    return stream


#: QEMU's descriptions are tens to hundreds of KiB; refuse to parse more than this
MAX_DESCRIPTION = 64 << 20
_SCAN_CHUNK = 1 << 20


def find_description(buf: memoryview) -> tuple[dict[str, Any], int] | None:
    """The JSON VM description at the end of ``buf`` and the offset of its 0x06 byte.

    JSON text holds no raw 0x06 byte, so the marker is among the last five 0x06 bytes
    (the other four could sit in the length field); None when there is none.  The scan
    goes backwards 1 MiB at a time and stops after five hits or MAX_DESCRIPTION bytes.
    """
    size = len(buf)
    if size < 6 or buf[size - 1] != ord("}"):
        return None
    hits: list[int] = []
    hi = size
    while hi > 0 and len(hits) < 5 and size - hi <= MAX_DESCRIPTION + 5:
        lo = max(0, hi - _SCAN_CHUNK)
        chunk = bytes(buf[lo:hi])
        at = len(chunk)
        while len(hits) < 5:
            at = chunk.rfind(b"\x06", 0, at)
            if at < 0:
                break
            hits.append(lo + at)
        hi = lo
    for q in hits:
        if q + 5 < size and U32.unpack_from(buf, q + 1)[0] == size - q - 5 \
                and buf[q + 5] == ord("{"):
            if size - q - 5 > MAX_DESCRIPTION:
                raise OversizedRecord(f"QEMU stream: VM description of {size - q - 5} bytes, "
                                      f"at most {MAX_DESCRIPTION} expected", q)
            try:
                desc = json.loads(bytes(buf[q + 5:]))
            except (ValueError, RecursionError) as exc:
                raise MalformedRecord(f"QEMU stream: the VM description is not valid JSON: "
                                      f"{exc}", q + 5) from None
            if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
                raise MalformedRecord("QEMU stream: expected a VM description object with "
                                      "a devices list", q + 5)
            return desc, q
    return None


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.cur = Cursor(buf)
        self.page_size = DEFAULT_PAGE_SIZE
        self.caps: list[str] = []
        self.devices: dict[tuple[str, int], dict[str, Any]] = {}
        self.block: RamBlock | None = None

    # --- top level -------------------------------------------------------------------

    def run(self) -> QemuStream:
        cur = self.cur
        magic = cur.be32("file magic 'QEVM'")
        if magic != QEMU_VM_FILE_MAGIC:
            raise BadMagic(f"not a QEMU stream: expected magic 'QEVM' (0x5145564d), found "
                           f"{bytes(self.buf[:4])!r}", 0)
        version = cur.be32("file version")
        if version != QEMU_VM_FILE_VERSION:
            raise UnsupportedVersion(f"QEMU stream version {version}: expected "
                                     f"{QEMU_VM_FILE_VERSION}", 4)
        self.s = QemuStream(version, len(self.buf))
        found = find_description(self.buf)
        if found is not None:
            self.s.description, self.s.description_offset = found
            cur.end = found[1]
            for dev in found[0]["devices"]:
                if isinstance(dev, dict):
                    self.devices[(str(dev.get("name")), int(dev.get("instance_id", 0)))] = dev
        if cur.peek8() == SectionType.CONFIGURATION:
            cur.pos += 1
            self._configuration()
        self._sections()
        return self.s

    def _sections(self) -> None:
        cur, s = self.cur, self.s
        while True:
            at = cur.pos
            t = cur.u8("a section type byte (0x00-0x08)")
            if t == SectionType.EOF:
                s.eof_offset = at
                s.order.append(("eof", -1, at))
                break
            if t in (SectionType.START, SectionType.FULL):
                self._section_start(at, SectionType(t))
            elif t in (SectionType.PART, SectionType.END):
                self._section_part(at, SectionType(t))
            elif t == SectionType.COMMAND:
                cmd = cur.be16("command number")
                n = cur.be16("command length")
                cur.skip(n, f"command {cmd} data")
                s.commands.append((cmd, at))
                s.order.append(("command", cmd, at))
            else:
                raise UnknownRecord(f"QEMU stream: expected a section type (EOF, START, PART, "
                                    f"END, FULL or COMMAND), found {t:#04x}", at)
        if cur.pos != cur.end:
            left = cur.end - cur.pos
            if cur.peek8() == SectionType.VMDESCRIPTION and left >= 5:
                (n,) = U32.unpack_from(self.buf, cur.pos + 1)
                raise TruncatedRecord(f"QEMU stream truncated: expected a VM description of "
                                      f"{n} bytes after QEMU_VM_EOF, {left - 5} present",
                                      cur.pos)
            raise MalformedRecord(f"QEMU stream: expected the VM description (0x06 | u32 len "
                                  f"| JSON) or the end of the file after QEMU_VM_EOF, found "
                                  f"{left} other bytes", cur.pos)
        s.accounted = s.size if s.description_offset is not None else cur.pos

    # --- configuration -----------------------------------------------------------------

    def _configuration(self) -> None:
        cur, conf = self.cur, self.s.configuration
        n = cur.be32("configuration machine name length")
        raw = bytes(cur.take(n, "configuration machine name"))
        self.s.machine = raw.decode("ascii", "replace")
        conf["machine"] = self.s.machine
        while cur.peek8() == SUBSECTION:
            at = cur.pos
            cur.pos += 1
            name = cur.idstr("configuration subsection name")
            cur.be32(f"version of {name}")
            if name == "configuration/target-page-bits":
                bits = cur.be32("target page bits")
                if not 10 <= bits <= 16:
                    raise MalformedRecord(f"QEMU stream: target page bits {bits}, expected "
                                          "10..16", cur.pos - 4)
                self.page_size = 1 << bits
                conf["target_page_bits"] = bits
            elif name == "configuration/capabilities":
                count = cur.be32("capability count")
                self.caps = [cur.idstr("capability name") for _ in range(min(count, cur.left))]
                conf["capabilities"] = self.caps
            elif name == "configuration/uuid":
                conf["uuid"] = bytes(cur.take(16, "uuid")).hex()
            else:
                raise UnknownRecord(f"QEMU stream: unknown configuration subsection {name!r}",
                                    at)

    # --- sections ----------------------------------------------------------------------

    def _section_start(self, at: int, t: SectionType) -> None:
        cur = self.cur
        sid = cur.be32("section id")
        idstr = cur.idstr("section name")
        instance = cur.be32(f"instance id of {idstr}")
        version = cur.be32(f"version id of {idstr}")
        if sid in self.s.sections:
            raise MalformedRecord(f"QEMU stream: section id {sid} ({idstr!r}) started twice",
                                  at)
        kind = {"ram": "ram", "spapr/htab": "htab"}.get(idstr)
        dev = self.devices.get((idstr, instance))
        if kind is None:
            kind = "vmstate" if dev is not None and t == SectionType.FULL else "opaque"
        sec = Section(sid, idstr, instance, version, at, kind)
        self.s.sections[sid] = sec
        self._piece(sec, at, t, dev)

    def _section_part(self, at: int, t: SectionType) -> None:
        sid = self.cur.be32("section id")
        sec = self.s.sections.get(sid)
        if sec is None:
            raise MalformedRecord(f"QEMU stream: section id {sid} continues a section that "
                                  "was never started (expected a START before PART/END)", at)
        if sec.ended:
            raise MalformedRecord(f"QEMU stream: section {sec.idstr!r} (id {sid}) continues "
                                  "after its END", at)
        self._piece(sec, at, t, None)

    def _piece(self, sec: Section, at: int, t: SectionType, dev: dict[str, Any] | None) -> None:
        self.s.order.append((t.name.lower(), sec.section_id, at))
        handler: Callable[[Section], None]
        if sec.kind == "ram":
            handler = self._ram
        elif sec.kind == "htab":
            handler = self._htab
        elif sec.kind == "vmstate":
            assert dev is not None
            if int(dev.get("version", sec.version_id)) != sec.version_id:
                raise MalformedRecord(f"QEMU stream: section {sec.idstr!r} has version "
                                      f"{sec.version_id}, its description says "
                                      f"{dev.get('version')}", at)
            sec.vmsd_name = str(dev.get("vmsd_name", sec.idstr))
            handler = lambda s: walk_device(self.cur, dev, s.fields, s.subsections)  # noqa: E731
        else:
            handler = self._opaque
        handler(sec)
        self._footer(sec)
        sec.parts += 1
        sec.bytes += self.cur.pos - at
        if t in (SectionType.END, SectionType.FULL):
            sec.ended = True

    def _footer(self, sec: Section) -> None:
        cur = self.cur
        at = cur.pos
        mark = cur.u8(f"section footer of {sec.idstr!r}")
        if mark != SECTION_FOOTER:
            raise MalformedRecord(
                f"QEMU stream: expected section footer 0x7e after section {sec.idstr!r} "
                f"(id {sec.section_id}), found {mark:#04x}", at)
        sid = cur.be32("section footer id")
        if sid != sec.section_id:
            raise MalformedRecord(
                f"QEMU stream: section footer of {sec.idstr!r} names section id {sid}, "
                f"expected {sec.section_id}", at + 1)

    def _opaque(self, sec: Section) -> None:
        """A section no description covers: find its footer (0x7e | id | next type byte)."""
        cur = self.cur
        pattern = bytes([SECTION_FOOTER]) + U32.pack(sec.section_id)
        pos, step = cur.pos, 1 << 20
        while pos < cur.end:
            chunk = bytes(self.buf[pos:min(cur.end, pos + step + 5)])
            k = chunk.find(pattern)
            while k >= 0:
                nxt = pos + k + 5
                if nxt == cur.end or self.buf[nxt] <= SectionType.COMMAND:
                    cur.pos = pos + k
                    return
                k = chunk.find(pattern, k + 1)
            pos += step
        why = ("no VM description at the end of the stream to decode it (truncated, or "
               "written without one)" if self.s.description is None else
               "the VM description does not cover it")
        raise MalformedRecord(f"QEMU stream: section {sec.idstr!r} (id {sec.section_id}): "
                              f"{why}; expected its section footer (0x7e | id) after it, "
                              "found none", cur.pos)

    # --- RAM ---------------------------------------------------------------------------

    def _ram(self, sec: Section) -> None:
        if self.s.ram is None:
            self.s.ram = RamSummary(self.page_size)
        ram, cur = self.s.ram, self.cur
        mask = self.page_size - 1
        last_kind, same = 0, 0
        while True:
            at = cur.pos
            hdr = cur.be64("a RAM record header (u64 offset | RAM_SAVE_FLAG_*)")
            flags, addr = hdr & mask, hdr & ~mask & _U64_MASK
            if flags == RamFlag.EOS:
                ram.passes += 1
                return
            if flags == RamFlag.MEM_SIZE:
                self._ram_blocks(ram, addr, at)
                continue
            kind = flags & ~RamFlag.CONTINUE
            if kind not in (RamFlag.ZERO, RamFlag.PAGE, RamFlag.XBZRLE, RamFlag.COMPRESS_PAGE):
                raise UnknownRecord(
                    f"QEMU stream: RAM record flags {flags:#x}: expected one of ZERO, PAGE, "
                    "XBZRLE, COMPRESS_PAGE (optionally with CONTINUE), MEM_SIZE or EOS", at)
            block = self._ram_block(flags, at)
            if addr + self.page_size > block.length:
                raise MalformedRecord(f"QEMU stream: RAM page offset {addr:#x} outside block "
                                      f"{block.name!r} of {block.length:#x} bytes", at)
            self._ram_body(ram, block, kind, at)
            same = same + 1 if kind == last_kind else 1
            last_kind = kind
            if same >= _RUN_AFTER and flags & RamFlag.CONTINUE and kind in (
                    RamFlag.ZERO, RamFlag.PAGE):
                self._ram_run(ram, block, kind)
                same = 0

    def _ram_block(self, flags: int, at: int) -> RamBlock:
        assert self.s.ram is not None
        if flags & RamFlag.CONTINUE:
            if self.block is None:
                raise MalformedRecord("QEMU stream: RAM record with CONTINUE but no block "
                                      "named before it", at)
            return self.block
        name = self.cur.idstr("RAM block name")
        block = self.s.ram.blocks.get(name)
        if block is None:
            raise MalformedRecord(f"QEMU stream: RAM page for unknown block {name!r} "
                                  f"(known: {sorted(self.s.ram.blocks)})", at + 8)
        self.block = block
        return block

    def _ram_body(self, ram: RamSummary, block: RamBlock, kind: int, at: int) -> None:
        cur = self.cur
        if kind == RamFlag.ZERO:
            if cur.u8("zero page fill byte"):
                ram.nonzero_fill += 1
            ram.zero_pages += 1
            block.zero_pages += 1
        elif kind == RamFlag.PAGE:
            cur.skip(self.page_size, f"page body of block {block.name!r}")
            ram.normal_pages += 1
            block.normal_pages += 1
        elif kind == RamFlag.XBZRLE:
            enc = cur.u8("XBZRLE encoding flag")
            if enc != ENCODING_FLAG_XBZRLE:
                raise MalformedRecord(f"QEMU stream: XBZRLE encoding flag {enc:#x}, expected "
                                      f"{ENCODING_FLAG_XBZRLE:#x}", cur.pos - 1)
            n = cur.be16("XBZRLE length")
            if n > self.page_size:
                raise OversizedRecord(f"QEMU stream: XBZRLE page of {n} bytes, at most "
                                      f"{self.page_size} expected", cur.pos - 2)
            cur.skip(n, "XBZRLE data")
            ram.xbzrle_pages += 1
        else:
            n = cur.be32("compressed page length")
            if n > 2 * self.page_size:
                raise OversizedRecord(f"QEMU stream: compressed page of {n} bytes, at most "
                                      f"{2 * self.page_size} expected", cur.pos - 4)
            cur.skip(n, "compressed page data")
            ram.compressed_pages += 1

    def _ram_run(self, ram: RamSummary, block: RamBlock, kind: int) -> None:
        """Consume a run of CONTINUE records of ``kind`` with array operations."""
        cur = self.cur
        stride = 9 if kind == RamFlag.ZERO else 8 + self.page_size
        mask = np.uint64(self.page_size - 1)
        want = np.uint64(kind | RamFlag.CONTINUE)
        limit = np.uint64(block.length - self.page_size)
        chunk = 64
        while True:
            n = min(chunk, (cur.end - cur.pos) // stride)
            if n <= 0:
                return
            hdrs = np.ndarray((n,), dtype=">u8", buffer=self.buf, offset=cur.pos,
                              strides=(stride,))
            bad = np.flatnonzero((hdrs & mask) != want)
            k = int(bad[0]) if len(bad) else n
            if k:
                offs = hdrs[:k] & ~mask
                over = np.flatnonzero(offs > limit)
                if len(over):
                    at = cur.pos + int(over[0]) * stride
                    raise MalformedRecord(f"QEMU stream: RAM page offset "
                                          f"{int(offs[over[0]]):#x} outside block "
                                          f"{block.name!r} of {block.length:#x} bytes", at)
                if kind == RamFlag.ZERO:
                    fills = np.ndarray((k,), dtype=np.uint8, buffer=self.buf,
                                       offset=cur.pos + 8, strides=(stride,))
                    ram.nonzero_fill += int(np.count_nonzero(fills))
                    ram.zero_pages += k
                    block.zero_pages += k
                else:
                    ram.normal_pages += k
                    block.normal_pages += k
                cur.pos += k * stride
            if k < n:
                return
            chunk = min(chunk * 4, _RUN_CHUNK_MAX)

    def _ram_blocks(self, ram: RamSummary, total: int, at: int) -> None:
        cur = self.cur
        if ram.blocks:
            raise MalformedRecord("QEMU stream: a second RAM block list (MEM_SIZE)", at)
        ram.total = total
        left = total
        while left:
            bat = cur.pos
            name = cur.idstr("RAM block name")
            length = cur.be64(f"length of RAM block {name!r}")
            if length > left or length % self.page_size:
                raise MalformedRecord(
                    f"QEMU stream: RAM block {name!r} of {length:#x} bytes: expected a "
                    f"multiple of the page size and at most the {left:#x} bytes the MEM_SIZE "
                    f"total leaves", bat)
            if name in ram.blocks:
                raise MalformedRecord(f"QEMU stream: RAM block {name!r} listed twice", bat)
            if "x-ignore-shared" in self.caps:
                cur.be64(f"address of RAM block {name!r}")
            ram.blocks[name] = RamBlock(name, length)
            left -= length

    # --- spapr/htab --------------------------------------------------------------------

    def _htab(self, sec: Section) -> None:
        if self.s.htab is None:
            self.s.htab = HtabSummary()
        h, cur = self.s.htab, self.cur
        at = cur.pos
        head = cur.be32("spapr/htab section header (htab shift, 0 or -1)")
        if head == 0xFFFFFFFF:
            return
        if head:
            if not 18 <= head <= 46:
                raise MalformedRecord(f"QEMU stream: spapr/htab shift {head}, expected "
                                      "18..46", at)
            h.shift = head
            return
        if h.shift is None:
            raise MalformedRecord("QEMU stream: spapr/htab entries before its size", at)
        entries = 1 << (h.shift - 4)
        while True:
            cat = cur.pos
            index = cur.be32("HPT chunk index")
            n_valid = cur.be16("HPT chunk valid count")
            n_invalid = cur.be16("HPT chunk invalid count")
            if index == 0 and n_valid == 0 and n_invalid == 0:
                return
            if index + n_valid + n_invalid > entries:
                raise MalformedRecord(f"QEMU stream: HPT chunk {index}+{n_valid}+{n_invalid} "
                                      f"past the {entries} entries of a 2^{h.shift} table",
                                      cat)
            cur.skip(n_valid * HPTE_SIZE, "HPT entries")
            h.chunks += 1
            h.valid += n_valid
            h.invalid += n_invalid


__all__ = ["StreamDecodeError", "find_description", "is_qemu_stream", "read_stream"]
