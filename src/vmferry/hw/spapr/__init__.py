"""sPAPR (pseries) platform models: the TCE paravirtual IOMMU and its hypercalls.

Public surface::

    SpaprIommu(memory, windows, *, groups=1, shared_tables=True, mode="correct",
               hw_page_shift=16, host=None, slot_sizes=None)
        .hcall(opcode, *args, vcpu=0) -> HcallResult     # what the guest sees
        .dma_write(liobn, ioba, data, *, group=0) / .dma_read(liobn, ioba, n, *, group=0)
        .check_invariants()                              # INV rules, recorded hazards
        .save() -> SpaprTceState / .restore(state) -> RebuildReport
    WindowSpec.from_definition(d) / windows_from_definition(vm_definition)
    persist.encode_state(state) -> bytes / persist.decode_state(data) -> SpaprTceState
"""

from vmferry.hw.spapr.hcall import Hcall, HcallResult, HRet
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec, windows_from_definition
from vmferry.hw.spapr.persist import (
    RebuildReport,
    SpaprTceState,
    WindowState,
    decode_state,
    encode_state,
)
from vmferry.hw.spapr.tce import MODES, DmaDirection, DmaFault

__all__ = [
    "MODES",
    "DmaDirection",
    "DmaFault",
    "HRet",
    "Hcall",
    "HcallResult",
    "RebuildReport",
    "SpaprIommu",
    "SpaprTceState",
    "WindowSpec",
    "WindowState",
    "decode_state",
    "encode_state",
    "windows_from_definition",
]
