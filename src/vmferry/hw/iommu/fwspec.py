"""``struct iommu_fwspec`` and ``struct dev_iommu`` (v6.11+ layout, docs/models/iommu-probe.md
§2.2-§2.3).

The operations on them (``iommu_fwspec_init``, ``_add_ids``, ``_free``, ``dev_iommu_get``
and ``_free``) need the instance list and the probe lock, so they live on
:class:`vmferry.hw.iommu.core.IommuCore`; this module holds the objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmferry.hw.iommu.dt import DtNode
from vmferry.hw.iommu.heap import Ref

if TYPE_CHECKING:
    from vmferry.hw.iommu.core import IommuDevice

#: IOMMU_FWSPEC_* flags (include/linux/iommu.h)
IOMMU_FWSPEC_PCI_RC_ATS = 1 << 0
IOMMU_FWSPEC_PCI_RC_CANWBS = 1 << 1

#: sizeof(struct iommu_fwspec) since v6.11, and per ID
FWSPEC_HEADER_SIZE = 16
FWSPEC_ID_SIZE = 4


@dataclass(eq=False)
class Fwspec:
    """Firmware description of the IOMMU a device sits behind and its master IDs.

    Invariant: ``num_ids == len(ids) <= capacity``; the first allocation has room for one
    ID, every growth beyond that is a reallocation (a new heap object).
    """

    iommu_fwnode: DtNode | None
    flags: int = 0
    ids: list[int] = field(default_factory=list)
    capacity: int = 1

    @property
    def num_ids(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        return FWSPEC_HEADER_SIZE + FWSPEC_ID_SIZE * self.capacity


@dataclass(eq=False)
class DevIommu:
    """Per-device IOMMU core data.  ``iommu_dev`` is None until probe_device succeeded."""

    fwspec: Ref[Fwspec] | None = None
    iommu_dev: IommuDevice | None = None
    #: IOMMU-driver private data (dev_iommu_priv_set); never freed by the core
    priv: Ref[object] | None = None
    max_pasids: int = 0
    attach_deferred: bool = False
