"""The persist contract of migratable components, and the declarative codec of their state.

Theory of operation
-------------------
A component that migrates has a plain state type beside it (a frozen dataclass holding
values, never runtime handles) and two methods, as in firecracker's ``Persist``:

* ``save() -> State`` cannot fail: it reads what is there;
* ``restore(state)`` can: it raises a typed error (a :class:`~vmferry.errors.ModelError`
  or :class:`~vmferry.errors.StreamDecodeError` subclass) and changes nothing it refused.

The bytes of a state in the stream are declared once, as data, by a :class:`Layout`::

    magic (4 bytes) | u16 version | fixed fields (one struct.Struct) | variable fields

Fixed fields are integers (``u8`` ... ``u64``, ``i32``, ``i64``) and enums, encoded by
their explicit value (an ``IntEnum``'s number, a string enum's value as a tagged name) --
never by position in a declaration.  Variable fields are ``str16`` (u16 length + UTF-8)
and ``bytes32`` (u32 length + bytes) and come last, in order.  :meth:`Layout.decode` checks
size, magic and version before reading a field, accepts the versions the layout names,
consumes the buffer exactly, and raises :class:`~vmferry.errors.BadMagic`,
:class:`~vmferry.errors.UnsupportedVersion`, :class:`~vmferry.errors.TruncatedRecord` or
:class:`~vmferry.errors.MalformedRecord` naming the component and the offset.

A format this project does not own has no room for that header: a kernel driver's
uAPI-visible struct (hisi_acc's ``acc_vf_data``) or a firmware image (mlx5's FW_DATA)
keeps its own bytes, and its owner tells versions apart by the value of its first field,
a magic.  Such a format is a :class:`StructLayout`: a key field and, per version, the
key's value and the fields after it (fixed size, integers, integer arrays and enums).

Versions are negotiated, never guessed: a destination announces at pre-flight the
newest version it reads of each state, and the source writes
:func:`write_version` of that -- version 1 for a destination of a release that announces
nothing -- so a new source feeds an old destination the bytes it has always read.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from vmferry.errors import BadMagic, MalformedRecord, TruncatedRecord, UnsupportedVersion

S = TypeVar("S")

_INTS = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i32": "i", "i64": "q"}
_VARIABLE = {"str16": "H", "bytes32": "I"}
#: a 4-byte tag (a magic), only as the key of a StructLayout
TAG4 = "tag4"


class Persist(Protocol[S]):
    """A migratable component: ``save`` cannot fail, ``restore`` raises a typed error."""

    def save(self) -> S: ...

    def restore(self, state: S, /) -> object: ...


@dataclass(frozen=True)
class Field:
    """One declared field: a name and a kind (``u32``, ``str16``...) or an enum class.

    An enum is encoded by its explicit integer value (an ``IntEnum``): as ``u16`` for
    ``enum16``, or as the integer kind given with it (``Field("state", "u32", QmState)``).
    ``count`` > 1 declares an array of that many integers (StructLayout only), read as a
    tuple.
    """

    name: str
    kind: str
    enum: type[enum.IntEnum] | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _INTS and self.kind not in _VARIABLE \
                and self.kind not in ("enum16", TAG4):  # fmt: skip
            raise ValueError(f"field {self.name}: unknown kind {self.kind!r}")
        if self.kind == "enum16" and self.enum is None:
            raise ValueError(f"field {self.name}: enum16 needs an IntEnum class")
        if self.enum is not None and self.kind != "enum16" and self.kind not in _INTS:
            raise ValueError(f"field {self.name}: an enum is encoded as an integer kind")
        if self.count < 1 or (self.count > 1 and (self.kind not in _INTS or self.enum)):
            raise ValueError(f"field {self.name}: only plain integers come in arrays")

    @property
    def code(self) -> str:
        """The field's struct format code (without the byte order)."""
        if self.kind == TAG4:
            return "4s"
        base = "H" if self.kind == "enum16" else _INTS[self.kind]
        return f"{self.count}{base}" if self.count > 1 else base


def enum16(name: str, cls: type[enum.IntEnum]) -> Field:
    """An IntEnum field, encoded by its explicit value as ``u16``."""
    return Field(name, "enum16", cls)


@dataclass(frozen=True)
class Layout:
    """A component state's bytes, declared once: magic, accepted versions, fields."""

    component: str
    magic: bytes
    version: int
    fields: Sequence[Field]
    #: older versions a decoder still accepts (their layout is the same)
    accepts: frozenset[int] = frozenset()
    endian: str = ">"
    _fixed: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.magic) != 4:
            raise ValueError(f"{self.component}: magic must be 4 bytes")
        seen_variable = False
        codes = [self.endian, "4sH"]
        for f in self.fields:
            if f.kind in _VARIABLE:
                seen_variable = True
                continue
            if seen_variable:
                raise ValueError(f"{self.component}: fixed field {f.name} after a variable one")
            if f.count != 1 or f.kind == TAG4:
                raise ValueError(f"{self.component}: {f.name}: arrays and tags are for a "
                                 "StructLayout")
            codes.append(f.code)
        codes += [_VARIABLE[f.kind] for f in self.fields if f.kind in _VARIABLE]
        object.__setattr__(self, "_fixed", struct.Struct("".join(codes)))

    @property
    def header_size(self) -> int:
        return self._fixed.size

    @property
    def fixed(self) -> struct.Struct:
        """The struct of the header (magic, version, fixed fields, variable lengths), for a
        component that keeps its state in place as these bytes (a device image's registers)
        and reads or updates them without a decode.  Bytes crossing a boundary go through
        :meth:`encode` / :meth:`decode`."""
        return self._fixed

    def encode(self, values: Mapping[str, Any]) -> bytes:
        """Pack ``values`` (one per field); cannot fail for values of the declared types."""
        fixed: list[Any] = [self.magic, self.version]
        tails: list[bytes] = []
        for f in self.fields:
            v = values[f.name]
            if f.kind == "str16":
                tails.append(str(v).encode()[:0xFFFF])
            elif f.kind == "bytes32":
                tails.append(bytes(v))
            else:
                fixed.append(int(v))
        fixed += [len(t) for t in tails]
        return self._fixed.pack(*fixed) + b"".join(tails)

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """Check size, magic and version, then read every field; typed errors otherwise."""
        data = bytes(data)
        what = f"{self.component} state"
        if len(data) < self._fixed.size:
            raise TruncatedRecord(f"{what} shorter than its {self._fixed.size}-byte header",
                                  len(data))
        raw = self._fixed.unpack_from(data)
        if raw[0] != self.magic:
            raise BadMagic(f"{what}: magic {raw[0]!r}, expected {self.magic!r}", 0)
        if raw[1] != self.version and raw[1] not in self.accepts:
            raise UnsupportedVersion(f"{what}: version {raw[1]} (this build reads "
                                     f"{sorted({self.version, *self.accepts})})", 4)
        out: dict[str, Any] = {"version": raw[1]}
        fixed = [f for f in self.fields if f.kind not in _VARIABLE]
        variable = [f for f in self.fields if f.kind in _VARIABLE]
        for f, v in zip(fixed, raw[2:], strict=False):
            out[f.name] = self._enum(f, v) if f.enum is not None else v
        lengths = raw[2 + len(fixed):]
        if len(data) != self._fixed.size + sum(lengths):
            raise MalformedRecord(f"{what}: {len(data)} bytes, its header says "
                                  f"{self._fixed.size + sum(lengths)}", 0)
        off = self._fixed.size
        for f, n in zip(variable, lengths, strict=True):
            chunk = data[off:off + n]
            if f.kind == "str16":
                try:
                    out[f.name] = chunk.decode()
                except UnicodeDecodeError as exc:
                    raise MalformedRecord(f"{what}: {f.name}: {exc}", off) from exc
            else:
                out[f.name] = chunk
            off += n
        return out

    def decode_head(self, data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
        """The header of an envelope whose body repeats (a count field, then records):
        the same checks as :meth:`decode`, the fixed fields, and the offset of the body.
        Only for layouts without variable fields."""
        if any(f.kind in _VARIABLE for f in self.fields):
            raise ValueError(f"{self.component}: decode_head needs fixed fields only")
        data = bytes(data[:self._fixed.size])
        what = f"{self.component} state"
        if len(data) < self._fixed.size:
            raise TruncatedRecord(f"{what} shorter than its {self._fixed.size}-byte header",
                                  len(data))
        out = self.decode(data)
        return out, self._fixed.size

    def _enum(self, f: Field, value: int) -> enum.IntEnum:
        return _enum(self.component, f, value, 6)


def _enum(component: str, f: Field, value: int, offset: int) -> enum.IntEnum:
    assert f.enum is not None
    try:
        return f.enum(value)
    except ValueError as exc:
        raise MalformedRecord(f"{component} state: {f.name} {value} is not a "
                              f"{f.enum.__name__}", offset) from exc


@dataclass(frozen=True)
class StructVersion:
    """One version of a :class:`StructLayout`: its number, the value its key field holds
    in this version, and the fields after the key, in order."""

    number: int
    key: int | bytes
    fields: Sequence[Field]


@dataclass(frozen=True)
class StructLayout:
    """A fixed-size struct of a format with no version field of its own, declared once:
    the key field (a magic) whose value tells the versions apart, and every version.

    :meth:`encode` writes any declared version (the one the reader announced:
    :func:`write_version`); :meth:`decode` reads every declared version, exactly its size.
    """

    component: str
    key: Field
    versions: Sequence[StructVersion]
    endian: str = "<"
    _structs: dict[int, struct.Struct] = field(init=False, repr=False, compare=False)
    _offsets: dict[int, dict[str, tuple[int, struct.Struct]]] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.key.kind != TAG4 and (self.key.kind not in _INTS or self.key.count != 1):
            raise ValueError(f"{self.component}: the key is a tag4 or one integer")
        numbers = [v.number for v in self.versions]
        keys = [v.key for v in self.versions]
        if not numbers or len(set(numbers)) != len(numbers) or len(set(keys)) != len(keys):
            raise ValueError(f"{self.component}: versions and their keys must be distinct")
        structs: dict[int, struct.Struct] = {}
        offsets: dict[int, dict[str, tuple[int, struct.Struct]]] = {}
        for v in self.versions:
            if isinstance(v.key, bytes) != (self.key.kind == TAG4):
                raise ValueError(f"{self.component}: version {v.number}'s key is not a "
                                 f"{self.key.kind}")
            at: dict[str, tuple[int, struct.Struct]] = {}
            code = self.endian
            for f in (self.key, *v.fields):
                if f.kind in _VARIABLE:
                    raise ValueError(f"{self.component}: {f.name}: a struct is fixed-size")
                one = struct.Struct(self.endian + f.code)
                at[f.name] = (struct.calcsize(code), one)
                code += f.code
            structs[v.number] = struct.Struct(code)
            offsets[v.number] = at
        object.__setattr__(self, "_structs", structs)
        object.__setattr__(self, "_offsets", offsets)

    @property
    def newest(self) -> int:
        return max(self._structs)

    def size(self, version: int) -> int:
        return self._structs[version].size

    def field_at(self, version: int, name: str) -> tuple[int, struct.Struct]:
        """Offset and struct of one field in ``version``, for a component that keeps its
        state in place as these bytes (a device's registers)."""
        return self._offsets[version][name]

    def _version(self, number: int) -> StructVersion:
        for v in self.versions:
            if v.number == number:
                return v
        raise ValueError(f"{self.component}: no version {number} is declared")

    def encode(self, values: Mapping[str, Any], version: int) -> bytes:
        """Pack ``values`` (one per field after the key) as ``version``; cannot fail for
        values of the declared types (an undeclared version is a ValueError: a bug)."""
        v = self._version(version)
        out: list[Any] = [v.key]
        for f in v.fields:
            if f.count > 1:
                out.extend(int(x) for x in values[f.name])
            else:
                out.append(int(values[f.name]))
        return self._structs[version].pack(*out)

    def version_of(self, data: bytes | bytearray | memoryview) -> int:
        """The version whose key ``data`` starts with: TruncatedRecord when shorter than
        the key, UnsupportedVersion for a key no version declares."""
        offset, one = self.field_at(self.versions[0].number, self.key.name)
        if len(data) < offset + one.size:
            raise TruncatedRecord(f"{self.component} state shorter than its "
                                  f"{self.key.name}", len(data))
        (key,) = one.unpack_from(data, offset)
        for v in self.versions:
            if v.key == key:
                return v.number
        shown = repr(key) if isinstance(key, bytes) else f"{key:#x}"
        raise UnsupportedVersion(f"{self.component} state: {self.key.name} {shown} names no "
                                 f"version this build reads ({sorted(self._structs)})", offset)

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """Every field of ``data``, which must be exactly one struct of the version its key
        names; ``version`` holds that number.  Typed errors otherwise."""
        number = self.version_of(data)
        st = self._structs[number]
        if len(data) != st.size:
            error = TruncatedRecord if len(data) < st.size else MalformedRecord
            raise error(f"{self.component} state version {number}: {len(data)} bytes, "
                        f"not {st.size}", min(len(data), st.size))
        raw = iter(st.unpack_from(data))
        next(raw)  # the key
        out: dict[str, Any] = {"version": number}
        for f in self._version(number).fields:
            if f.count > 1:
                out[f.name] = tuple(next(raw) for _ in range(f.count))
            elif f.enum is not None:
                out[f.name] = _enum(self.component, f, next(raw),
                                    self.field_at(number, f.name)[0])
            else:
                out[f.name] = next(raw)
        return out


def write_version(component: str, newest: int, readable: object) -> int:
    """The version of ``component``'s state to write for a reader that announced
    ``readable`` as the newest it reads: None is a reader of the release before the
    announcement, which reads version 1 only.  A malformed announcement is a
    MalformedRecord."""
    if readable is None:
        return 1
    if not isinstance(readable, int) or isinstance(readable, bool) or readable < 1:
        raise MalformedRecord(f"{component} state version {readable!r} announced by the "
                              "destination")
    return min(newest, readable)
