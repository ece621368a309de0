"""The host's memory map of a guest: memslots gpa -> ua, and the pages backing each ua.

A :class:`Memslot` maps a guest-physical range onto host userspace addresses (the VMM's
mapping of guest RAM) backed by host pages of ``backing_shift`` (64 KiB pages, or 16 MiB
huge pages) at physical addresses starting at ``hpa``.  Backing is contiguous per slot.  A
source and a destination host describe the same guest RAM with different ``ua``/``hpa``.

Hot-unplug removes a slot from the map (KVM's memslot and the VMM's section go away); the
pages pinned by a preregistered region stay pinned (see :mod:`.prereg`) but no longer
belong to any guest address: ``hpa_to_gpa`` does not find them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmferry.hw.spapr.tce import HOST_PAGE_SHIFT, SpaprError

DEFAULT_UA_BASE = 0x7FFF_0000_0000
DEFAULT_HPA_BASE = 0x0000_2000_0000_0000


@dataclass(frozen=True)
class Memslot:
    gpa: int
    size: int
    ua: int
    hpa: int
    backing_shift: int = HOST_PAGE_SHIFT

    def __post_init__(self) -> None:
        page = (1 << HOST_PAGE_SHIFT) - 1
        if self.size <= 0 or (self.gpa | self.size | self.ua | self.hpa) & page:
            raise SpaprError(f"memslot {self} is empty or not host-page aligned")

    def has_gpa(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size

    def has_ua(self, ua: int) -> bool:
        return self.ua <= ua < self.ua + self.size

    def has_hpa(self, hpa: int) -> bool:
        return self.hpa <= hpa < self.hpa + self.size


class HostMemoryMap:
    """Memslots of one guest on one host.  Invariant: slots do not overlap in gpa/ua/hpa."""

    def __init__(self, slots: Sequence[Memslot]) -> None:
        self.slots: list[Memslot] = []
        #: every slot ever plugged, so pinned pages stay describable after unplug
        self.backing: list[Memslot] = []
        for slot in slots:
            self.plug(slot)

    @classmethod
    def for_ram(
        cls,
        ram_size: int,
        *,
        slot_sizes: Sequence[int] | None = None,
        ua_base: int = DEFAULT_UA_BASE,
        hpa_base: int = DEFAULT_HPA_BASE,
        backing_shift: int = HOST_PAGE_SHIFT,
    ) -> HostMemoryMap:
        sizes = list(slot_sizes) if slot_sizes else [ram_size]
        if sum(sizes) != ram_size:
            raise SpaprError(f"slot sizes {sizes} do not add up to RAM size {ram_size:#x}")
        slots, gpa = [], 0
        for size in sizes:
            slots.append(Memslot(gpa, size, ua_base + gpa, hpa_base + gpa, backing_shift))
            gpa += size
        return cls(slots)

    def plug(self, slot: Memslot) -> None:
        for other in self.slots:
            if (
                other.has_gpa(slot.gpa)
                or slot.has_gpa(other.gpa)
                or other.has_ua(slot.ua)
                or slot.has_ua(other.ua)
            ):
                raise SpaprError(f"memslot {slot} overlaps {other}")
        self.slots.append(slot)
        if slot not in self.backing:
            self.backing.append(slot)

    def unplug(self, gpa: int) -> Memslot:
        for slot in self.slots:
            if slot.gpa == gpa:
                self.slots.remove(slot)
                return slot
        raise SpaprError(f"no memslot starts at gpa {gpa:#x}")

    def slot_of_gpa(self, gpa: int) -> Memslot | None:
        for slot in self.slots:
            if slot.has_gpa(gpa):
                return slot
        return None

    def gpa_to_ua(self, gpa: int) -> int | None:
        slot = self.slot_of_gpa(gpa)
        return None if slot is None else slot.ua + (gpa - slot.gpa)

    def ua_backing(self, ua: int) -> tuple[int, int] | None:
        """(hpa, backing page shift) of the page behind ``ua``, for pinning."""
        for slot in self.backing:
            if slot.has_ua(ua):
                return slot.hpa + (ua - slot.ua), slot.backing_shift
        return None

    def ua_to_gpa(self, ua: int) -> int | None:
        for slot in self.slots:
            if slot.has_ua(ua):
                return slot.gpa + (ua - slot.ua)
        return None

    def hpa_to_gpa(self, hpa: int) -> int | None:
        for slot in self.slots:
            if slot.has_hpa(hpa):
                return slot.gpa + (hpa - slot.hpa)
        return None
