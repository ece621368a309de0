"""The TCE tables as a migratable VM component (the ``machine.vm.Component`` shape).

``save_state`` encodes the guest view of every window (:func:`persist.encode_state`);
``load_state`` decodes it on the destination, loads it into the windows and rebuilds the
hardware tables with the destination's own gpa -> hpa map, keeping the
:class:`~vmferry.hw.spapr.persist.RebuildReport` in ``last_report``.  Decoding errors are
StreamDecodeError subclasses; restore/replay errors are TceRestoreError.
"""

from __future__ import annotations

from vmferry.hw.spapr.iommu import SpaprIommu
from vmferry.hw.spapr.persist import RebuildReport, decode_state, encode_state


class SpaprTceComponent:
    def __init__(self, iommu: SpaprIommu, name: str = "spapr-tce") -> None:
        self.name = name
        self.iommu = iommu
        self.last_report: RebuildReport | None = None

    def save_state(self) -> bytes:
        return encode_state(self.iommu.save())

    def load_state(self, data: bytes) -> None:
        state = decode_state(data)
        self.last_report = self.iommu.restore(state)
