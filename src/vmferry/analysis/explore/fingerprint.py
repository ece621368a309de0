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
import hashlib
import types
from collections.abc import Hashable
from typing import Any

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


class _Walker:
    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.keep: list[object] = []  # keeps walked objects alive so ids stay unique

    def walk(self, obj: Any) -> Hashable:
        if isinstance(obj, _ATOMS):
            return obj
        if isinstance(obj, enum.Enum):
            return (type(obj).__name__, obj.name)
        if isinstance(obj, _SKIP) or (callable(obj) and not hasattr(obj, "__dict__")):
            return "<code>"
        if type(obj) is tuple:  # immutable: its identity means nothing (``()`` is shared)
            return ("tuple", tuple(self.walk(x) for x in obj))
        ref = self.seen.get(id(obj))
        if ref is not None:
            return ("@", ref)
        self.seen[id(obj)] = len(self.seen)
        self.keep.append(obj)
        custom = getattr(type(obj), "__fingerprint__", None)
        if custom is not None:
            return (type(obj).__qualname__, self.walk(custom(obj)))
        if isinstance(obj, bytearray | memoryview):
            return ("b", hashlib.blake2b(bytes(obj), digest_size=16).digest())
        if type(obj).__module__ == "numpy" and hasattr(obj, "tobytes"):
            return ("nd", hashlib.blake2b(obj.tobytes(), digest_size=16).digest())
        if isinstance(obj, tuple | list):
            return (type(obj).__name__, tuple(self.walk(x) for x in obj))
        if isinstance(obj, dict):
            return ("dict", tuple((self.walk(k), self.walk(v)) for k, v in obj.items()))
        if isinstance(obj, set | frozenset):
            # walk the members in an order that does not depend on iteration order (ids):
            # sorted by what each looks like from here, numbered only after sorting
            def alone(x: object) -> str:
                probe = _Walker()
                probe.seen = dict(self.seen)
                return repr(probe.walk(x))

            return ("set", tuple(self.walk(x) for x in sorted(obj, key=alone)))
        fields: list[tuple[str, Hashable]] = []
        for slot in _slots(type(obj)):
            if hasattr(obj, slot):
                fields.append((slot, self.walk(getattr(obj, slot))))
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            fields.extend((k, self.walk(v)) for k, v in state.items())
        return (type(obj).__qualname__, tuple(fields))


def _slots(cls: type) -> list[str]:
    out: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        out.extend([slots] if isinstance(slots, str) else list(slots))
    return [s for s in out if s not in ("__dict__", "__weakref__")]
