"""Device sections decoded with the JSON VM description QEMU appends after QEMU_VM_EOF.

QEMU writes, for every FULL section, what its ``vmstate_save_state`` wrote: each field's
name, type, element size (the bytes actually written for one element) and ``array_len``;
``struct`` fields nest a description; subsections that were sent are listed after the
fields.  :func:`walk_device` follows it over the section's bytes and records where each
field sits (a :class:`~vmferry.interop.qemu.model.Field`), so payloads are read straight
from the stream without copying.

Subsections are found the way QEMU's loader finds them (``vmstate_subsection_load``): a
``0x05`` byte whose name starts with the parent's vmsd name is a subsection and must be
one the description declares; anything else ends the subsection list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmferry.errors import MalformedRecord
from vmferry.interop.qemu.format import SUBSECTION, Cursor
from vmferry.interop.qemu.model import Field

#: nesting bound: descriptions deeper than this are refused (QEMU's are < 10)
MAX_DEPTH = 32


def _bad(what: str, offset: int) -> MalformedRecord:
    return MalformedRecord(f"QEMU stream: {what}", offset)


def _int(desc: Mapping[str, Any], key: str, default: int | None, where: str, pos: int) -> int:
    v = desc.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _bad(f"VM description of {where}: {key} {v!r} is not a non-negative integer",
                   pos)
    return v


def walk_device(cur: Cursor, desc: Mapping[str, Any], out: dict[str, Field],
                subs: list[str]) -> None:
    """Walk one device's fields and subsections at ``cur``; fill ``out`` and ``subs``."""
    name = str(desc.get("vmsd_name", desc.get("name", "?")))
    _walk_vmsd(cur, desc, name, "", out, subs, 0)


def _walk_vmsd(cur: Cursor, desc: Mapping[str, Any], vmsd: str, prefix: str,
               out: dict[str, Field], subs: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _bad(f"VM description of {vmsd} nests deeper than {MAX_DEPTH}", cur.pos)
    fields = desc.get("fields", [])
    if not isinstance(fields, list):
        raise _bad(f"VM description of {vmsd}: fields is not a list", cur.pos)
    for f in fields:
        _walk_field(cur, f, vmsd, prefix, out, subs, depth)
    _walk_subsections(cur, desc, vmsd, prefix, out, subs, depth)


def _walk_field(cur: Cursor, f: Any, vmsd: str, prefix: str, out: dict[str, Field],
                subs: list[str], depth: int) -> None:
    if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
        raise _bad(f"VM description of {vmsd}: malformed field {str(f)[:80]}", cur.pos)
    fname = prefix + f["name"]
    count = _int(f, "array_len", 1, fname, cur.pos)
    ftype = str(f.get("type", ""))
    if ftype == "struct":
        inner = f.get("struct")
        if not isinstance(inner, Mapping):
            raise _bad(f"VM description: struct field {fname} has no struct", cur.pos)
        iname = str(inner.get("vmsd_name", fname))
        flat = _flat_size(inner, 0) if count > 1 else None
        if flat is not None:  # uniform elements: one bound check, one Field for the array
            start = cur.pos
            cur.skip(flat * count, f"field {fname} of {vmsd} ({count} x {flat} bytes, struct)")
            out[fname] = Field(fname, "struct", start, flat, count)
            return
        if count > max(cur.left, 1):
            raise _bad(f"VM description: {count} elements of struct {fname} but only "
                       f"{cur.left} bytes left in the stream", cur.pos)
        for i in range(count):
            sub = f"{fname}[{i}]." if count > 1 else f"{fname}."
            _walk_vmsd(cur, inner, iname, sub, out, subs, depth + 1)
        return
    size = _int(f, "size", None, fname, cur.pos)
    start = cur.pos
    cur.skip(size * count, f"field {fname} of {vmsd} ({count} x {size} bytes, {ftype})")
    key = fname
    if key in out:  # QEMU repeats names (e.g. "unused"): keep each one, numbered
        key = f"{fname}#{len(out)}"
    out[key] = Field(fname, ftype, start, size, count)


def _flat_size(desc: Mapping[str, Any], depth: int) -> int | None:
    """Bytes of one element of a struct without subsections (None: not uniform)."""
    if depth > MAX_DEPTH or desc.get("subsections"):
        return None
    total = 0
    for f in desc.get("fields", []):
        if not isinstance(f, Mapping):
            return None
        count = f.get("array_len", 1)
        if f.get("type") == "struct":
            inner = f.get("struct")
            one = _flat_size(inner, depth + 1) if isinstance(inner, Mapping) else None
        else:
            one = f.get("size")
        if not isinstance(one, int) or not isinstance(count, int) or one < 0 or count < 0:
            return None
        total += one * count
    return total


def _walk_subsections(cur: Cursor, desc: Mapping[str, Any], vmsd: str, prefix: str,
                      out: dict[str, Field], subs: list[str], depth: int) -> None:
    declared = {str(s.get("vmsd_name")): s for s in desc.get("subsections", []) or []
                if isinstance(s, Mapping)}
    while cur.peek8() == SUBSECTION:
        at = cur.pos
        n = cur.buf[at + 1] if at + 1 < cur.end else 0
        name = bytes(cur.buf[at + 2:at + 2 + n]).decode("ascii", "replace")
        if at + 2 + n > cur.end or not name.startswith(vmsd):
            return  # not a subsection of this vmsd: QEMU stops looking here as well
        sub = declared.get(name)
        if sub is None:
            raise _bad(f"subsection {name!r} of {vmsd} is not declared in the VM "
                       f"description (declared: {sorted(declared) or 'none'})", at)
        cur.pos = at + 2 + n
        version = cur.be32(f"version of subsection {name}")
        want = _int(sub, "version", 0, name, at)
        if version != want:
            raise _bad(f"subsection {name!r}: version {version}, the description says "
                       f"{want}", at + 2 + n)
        subs.append(prefix + name)
        _walk_vmsd(cur, sub, name, f"{prefix}{name}.", out, subs, depth + 1)
