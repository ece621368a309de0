"""A DMA window of the sPAPR IOMMU as a VM definition declares it (``tce_windows``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vmferry.errors import ConfigError

#: IOMMU page shifts a window may use (QEMU's default pgsz: 4K, 64K, 2M, 16M)
WINDOW_PAGE_SHIFTS = frozenset({12, 16, 21, 24})
_WINDOW_KEYS = {"liobn", "offset", "size_mib", "page_shift", "in_kernel"}


@dataclass(frozen=True)
class WindowSpec:
    """One DMA window: LIOBN, bus offset and size in bytes, IOMMU page shift."""

    liobn: int
    offset: int
    size: int
    page_shift: int
    in_kernel: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.liobn < 1 << 32:
            raise ConfigError(f"liobn {self.liobn:#x} must fit in 32 bits")
        if self.page_shift not in WINDOW_PAGE_SHIFTS:
            raise ConfigError(f"page_shift {self.page_shift} not in {sorted(WINDOW_PAGE_SHIFTS)}")
        page = (1 << self.page_shift) - 1
        if self.size <= 0 or self.size & page or self.offset < 0 or self.offset & page:
            raise ConfigError(
                f"window {self.offset:#x}+{self.size:#x} empty or not aligned to the page"
            )
        if self.offset + self.size > 1 << 64:
            raise ConfigError("window ends past 2^64")

    @property
    def entries(self) -> int:
        return self.size >> self.page_shift

    @classmethod
    def from_definition(cls, d: Mapping[str, object]) -> WindowSpec:
        """Build from a VM definition entry ``{"liobn", "offset", "size_mib", "page_shift"}``."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"tce window must be a mapping, got {type(d).__name__}")
        unknown = set(d) - _WINDOW_KEYS
        missing = {"liobn", "size_mib", "page_shift"} - set(d)
        if unknown or missing:
            raise ConfigError(
                f"tce window: unknown keys {sorted(unknown)}, missing {sorted(missing)}"
            )
        ints: dict[str, int] = {}
        for key in ("liobn", "offset", "size_mib", "page_shift"):
            value = d.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"tce window {key} must be an integer, got {value!r}")
            ints[key] = value
        in_kernel = d.get("in_kernel", True)
        if not isinstance(in_kernel, bool):
            raise ConfigError(f"tce window in_kernel must be a boolean, got {in_kernel!r}")
        if ints["size_mib"] <= 0:
            raise ConfigError(f"tce window size_mib must be positive, got {ints['size_mib']}")
        size = ints["size_mib"] << 20
        return cls(ints["liobn"], ints["offset"], size, ints["page_shift"], in_kernel)


def windows_from_definition(definition: Mapping[str, object]) -> list[WindowSpec]:
    """``tce_windows`` of a VM definition -> WindowSpecs (ConfigError on bad input).

    Absent key: no windows.  LIOBNs must be unique and windows must not overlap on the bus.
    """
    raw = definition.get("tce_windows", [])
    if not isinstance(raw, list):
        raise ConfigError(f"tce_windows must be a list, got {type(raw).__name__}")
    specs = [WindowSpec.from_definition(d) for d in raw]
    for i, a in enumerate(specs):
        for b in specs[i + 1 :]:
            if a.liobn == b.liobn:
                raise ConfigError(f"tce_windows: liobn {a.liobn:#x} used twice")
            if a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                raise ConfigError(f"tce_windows: windows {a.liobn:#x} and {b.liobn:#x} overlap")
    return specs
