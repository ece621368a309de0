"""Canonical state fingerprints for state-hash pruning.

:func:`fingerprint` turns the object graph reachable from a scenario's shared model into a
hashable value that is the same for two executions exactly when the graphs are the same up
to object identity: objects are numbered in the order a deterministic walk first meets
them, so a fresh heap address, ``id()`` or allocation order that differs between runs does
not change the value, while aliasing (two fields pointing at one object) does.

Walked: ``None``/bool/int/float/str/bytes, ``bytearray``/``memoryview``/numpy arrays (by
content), tuples, lists, dicts (in insertion order), sets (sorted by their members'
fingerprints), enums, and the ``__dict__``/``__slots__`` of other objects.  Skipped:
callables, modules, classes and greenlets (code, not state).  A class may define
``__fingerprint__(self)`` returning what stands for its state instead (an allocator leaves
out the serial numbers whose order depends on the schedule but whose value means nothing).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import types
from collections.abc import Hashable
from typing import Any, cast

import greenlet

_ATOMS = (type(None), bool, int, float, str, bytes, complex)
_SKIP = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType,
         type, greenlet.greenlet, types.GeneratorType)


def fingerprint(*roots: object, skip: tuple[object, ...] = ()) -> Hashable:
    """A canonical, hashable digest of everything reachable from ``roots``.

    Objects in ``skip`` (large, unchanging or separately digested state, such as guest
    RAM) stand for themselves by number only.
    """
    walker = _Walker()
    for i, obj in enumerate(skip):
        walker.seen[id(obj)] = -1 - i
    return walker.walk(roots)


# how a type is walked, decided once per type (see ``_kind``)
_ATOM, _ENUM, _CODE, _TUPLE, _CUSTOM, _BYTES, _ND, _SEQ, _DICT, _SET, _OBJ, _MAYBE_CODE = \
    range(12)
_KINDS: dict[type, int] = {}


def _kind(cls: type) -> int:
    kind = _KINDS.get(cls)
    if kind is not None:
        return kind
    if issubclass(cls, _ATOMS):
        kind = _ATOM
    elif issubclass(cls, enum.Enum):
        kind = _ENUM
    elif issubclass(cls, _SKIP):
        kind = _CODE
    elif cls is tuple:
        kind = _TUPLE
    elif getattr(cls, "__fingerprint__", None) is not None:
        kind = _CUSTOM
    elif issubclass(cls, bytearray | memoryview):
        kind = _BYTES
    elif cls.__module__ == "numpy" and hasattr(cls, "tobytes"):
        kind = _ND
    elif issubclass(cls, tuple | list):
        kind = _SEQ
    elif issubclass(cls, dict):
        kind = _DICT
    elif issubclass(cls, set | frozenset):
        kind = _SET
    else:
        # an instance of a class with ``__call__`` and no ``__dict__`` is code
        kind = _MAYBE_CODE if "__call__" in dir(cls) else _OBJ
    _KINDS[cls] = kind
    return kind


class _Walker:
    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.keep: list[object] = []  # keeps walked objects alive so ids stay unique

    def walk(self, obj: Any) -> Hashable:
        cls = type(obj)
        kind = _KINDS.get(cls)
        if kind is None:
            kind = _kind(cls)
        if kind == _ATOM:
            return obj  # type: ignore[no-any-return]
        if kind == _TUPLE:  # immutable: its identity means nothing (``()`` is shared)
            return ("tuple", tuple(map(self.walk, obj)))
        if kind == _ENUM:
            return (cls.__name__, obj.name)
        if kind == _CODE or (kind == _MAYBE_CODE and not hasattr(obj, "__dict__")):
            return "<code>"
        seen = self.seen
        ref = seen.get(id(obj))
        if ref is not None:
            return ("@", ref)
        seen[id(obj)] = len(seen)
        self.keep.append(obj)
        if kind in (_OBJ, _MAYBE_CODE):
            fields: list[tuple[str, Hashable]] = []
            for slot in _slots(cast(Hashable, cls)):
                if hasattr(obj, slot):
                    fields.append((slot, self.walk(getattr(obj, slot))))
            state = getattr(obj, "__dict__", None)
            if isinstance(state, dict):
                walk = self.walk
                fields.extend([(k, walk(v)) for k, v in state.items()])
            return (cls.__qualname__, tuple(fields))
        if kind == _DICT:
            walk = self.walk
            return ("dict", tuple([(walk(k), walk(v)) for k, v in obj.items()]))
        if kind == _SEQ:
            return (cls.__name__, tuple(map(self.walk, obj)))
        if kind == _CUSTOM:
            return (cls.__qualname__, self.walk(cls.__fingerprint__(obj)))
        if kind == _BYTES:
            return ("b", hashlib.blake2b(bytes(obj), digest_size=16).digest())
        if kind == _ND:
            return ("nd", hashlib.blake2b(obj.tobytes(), digest_size=16).digest())
        # a set: walk the members in an order that does not depend on iteration order
        # (ids): sorted by what each looks like from here, numbered only after sorting
        if all(type(x) in _ATOM_TYPES for x in obj):  # each walks to itself
            return ("set", tuple(sorted(obj, key=repr)))

        def alone(x: object) -> str:
            probe = _Walker()
            probe.seen = dict(self.seen)
            return repr(probe.walk(x))

        return ("set", tuple(self.walk(x) for x in sorted(obj, key=alone)))


_ATOM_TYPES = frozenset(_ATOMS)


@functools.cache
def _slots(cls: Hashable) -> list[str]:
    assert isinstance(cls, type)
    out: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        out.extend([slots] if isinstance(slots, str) else list(slots))
    return [s for s in out if s not in ("__dict__", "__weakref__")]
