"""A tiny checked heap: every kernel object the probe paths allocate lives here.

Theory of operation: model code never holds a kernel object directly across a yield
point; it holds a :class:`Ref` and reads through :meth:`Ref.get`, which raises
:class:`~vmferry.errors.UseAfterFree` once the object was freed.  :func:`deref` turns a
NULL (``None``) pointer into :class:`NullDeref`.  Freeing twice raises
:class:`~vmferry.errors.DoubleFree`.  Leak checks compare :meth:`Heap.live` with what is
reachable from the model's roots.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from vmferry.errors import DoubleFree, UseAfterFree
from vmferry.hw.iommu.errors import NullDeref

T = TypeVar("T")


class Ref(Generic[T]):
    """A pointer to a heap object.  Invariant: ``freed`` never goes back to False."""

    __slots__ = ("_obj", "freed", "kind", "serial")

    def __init__(self, kind: str, obj: T, serial: int) -> None:
        self.kind = kind
        self._obj = obj
        self.serial = serial
        self.freed = False

    def get(self) -> T:
        if self.freed:
            raise UseAfterFree(f"{self.kind}#{self.serial} used after free")
        return self._obj

    def __fingerprint__(self) -> tuple[str, object, bool]:
        """State without the serial: two schedules that allocate in another order reach
        the same state."""
        return (self.kind, self._obj, self.freed)

    def __repr__(self) -> str:
        state = "freed" if self.freed else "live"
        return f"<{self.kind}#{self.serial} {state}>"


def deref(ref: Ref[T] | None, what: str) -> T:
    """Follow a pointer that must not be NULL."""
    if ref is None:
        raise NullDeref(f"NULL pointer dereference: {what}")
    return ref.get()


class Heap:
    def __init__(self) -> None:
        self._live: dict[int, Ref[object]] = {}
        self._serial = 0
        self.allocations = 0
        self.frees = 0

    def alloc(self, kind: str, obj: T) -> Ref[T]:
        self._serial += 1
        ref = Ref(kind, obj, self._serial)
        self._live[ref.serial] = ref  # type: ignore[assignment]
        self.allocations += 1
        return ref

    def free(self, ref: Ref[T]) -> None:
        if ref.freed:
            raise DoubleFree(f"{ref.kind}#{ref.serial} freed twice")
        ref.freed = True
        del self._live[ref.serial]
        self.frees += 1

    def __fingerprint__(self) -> tuple[int, int, tuple[str, ...]]:
        """Counts and the kinds of the live objects, not the allocation order (see
        Ref.__fingerprint__); the live objects themselves are reached from the model."""
        return (self.allocations, self.frees, tuple(sorted(r.kind for r in self._live.values())))

    def live(self, kind: str | None = None) -> list[Ref[object]]:
        return [r for r in self._live.values() if kind is None or r.kind == kind]

    def __iter__(self) -> Iterator[Ref[object]]:
        return iter(list(self._live.values()))
