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


class Persist(Protocol[S]):
    """A migratable component: ``save`` cannot fail, ``restore`` raises a typed error."""

    def save(self) -> S: ...

    def restore(self, state: S, /) -> object: ...


@dataclass(frozen=True)
class Field:
    """One declared field: a name and a kind (``u32``, ``str16``...) or an enum class.

    An enum is encoded as ``u16`` of its explicit integer value (an ``IntEnum``).
    """

    name: str
    kind: str
    enum: type[enum.IntEnum] | None = None

    def __post_init__(self) -> None:
        if self.kind not in _INTS and self.kind not in _VARIABLE and self.kind != "enum16":
            raise ValueError(f"field {self.name}: unknown kind {self.kind!r}")
        if (self.kind == "enum16") != (self.enum is not None):
            raise ValueError(f"field {self.name}: enum16 needs an IntEnum class, and only it")


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
            codes.append("H" if f.kind == "enum16" else _INTS[f.kind])
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
        assert f.enum is not None
        try:
            return f.enum(value)
        except ValueError as exc:
            raise MalformedRecord(f"{self.component} state: {f.name} {value} is not a "
                                  f"{f.enum.__name__}", 6) from exc
