"""Pre-copy migration of a VM whose device DMAs through live TCE mappings (in one process).

The TCE tables ride as the ``spapr-tce`` component; the destination is a different host
(its own gpa -> ua -> hpa map) and rebuilds its hardware tables from the guest view.
Device DMA to the same IOBAs after migration lands in the same guest pages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from vmferry.clock import ManualClock
from vmferry.guest.dma import GuestDmaWindow
from vmferry.hw.spapr import SpaprIommu, windows_from_definition
from vmferry.hw.spapr.component import SpaprTceComponent
from vmferry.hw.spapr.hostmem import HostMemoryMap
from vmferry.hw.spapr.tce import DmaDirection
from vmferry.machine import VM, create_vm
from vmferry.machine import vm as vm_module
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import StreamDecoder

LIOBN = 0x80000000
HOSTS = {"src": 0x1000_0000_0000, "dst": 0x3000_0000_0000}


def _tce_feature(vm: VM, extra: Mapping[str, Any], host: Any) -> None:
    base = HOSTS["dst"] if getattr(host, "name", "") == "dst" else HOSTS["src"]
    hostmap = HostMemoryMap.for_ram(vm.ram.size, ua_base=base << 1, hpa_base=base)
    iommu = SpaprIommu(vm.ram, windows_from_definition(extra), hw_page_shift=12, host=hostmap)
    vm.add_component(SpaprTceComponent(iommu))


@pytest.fixture
def tce_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vm_module.FEATURES, "tce_windows", _tce_feature)


def _iommu(vm: VM) -> SpaprIommu:
    handler = vm.handlers["spapr-tce"]
    component = handler.component  # type: ignore[attr-defined]
    assert isinstance(component, SpaprTceComponent)
    return component.iommu


def test_precopy_with_live_dma_mappings(tce_feature: None) -> None:
    definition = {
        "name": "pseries-dma",
        "memory_mib": 32,
        "tce_windows": [{"liobn": LIOBN, "offset": 0, "size_mib": 256, "page_shift": 12}],
        "workload": {"dirty_rate_mbps": 50, "seed": 3},
    }
    src_vm = create_vm(definition)
    src = _iommu(src_vm)
    guest = GuestDmaWindow(
        src.hcall,
        src_vm.ram,
        liobn=LIOBN,
        offset=0,
        size=256 << 20,
        page_shift=12,
        list_page=0x10000,
    )
    rx = guest.map(0x100000, 64 << 10, DmaDirection.FROM_DEVICE)
    tx = guest.map(0x200000, 4096, DmaDirection.TO_DEVICE)
    src_vm.start()

    clock = ManualClock()
    source = SourceSession(src_vm, MigrationParams(), clock)
    decoder = StreamDecoder()

    def factory(d: Mapping[str, Any]) -> VM:
        return create_vm(d, vm_module.HostContext(name="dst"))

    dest = DestinationSession(clock, factory=factory)
    passes = 0

    def push(bufs: list[Any]) -> None:
        nonlocal passes
        for b in bufs:
            decoder.feed(b)
        for rec in decoder.events():
            dest.receive(rec)
        if src_vm.running:  # the device runs (and DMAs) exactly while the guest does
            passes += 1
            src.dma_write(LIOBN, rx.ioba + 512 * (passes % 100), passes.to_bytes(4, "little"))
        src_vm.run_slice(0.01)
        clock.advance(0.01)

    push(source.start())
    while bufs := source.next_buffers():
        push(bufs)
    decoder.eof()
    ack = dest.finish()
    source.complete(ack)

    dst_vm = dest.vm
    assert dst_vm is not None
    assert passes > 2
    for k in range(1, passes + 1):  # every DMA made during pre-copy reached the destination
        off = 512 * (k % 100)
        assert dst_vm.ram.read(0x100000 + off, 4) == src_vm.ram.read(0x100000 + off, 4)
    dst = _iommu(dst_vm)
    dst.check_invariants()
    assert dst.window(LIOBN).view.dense().tobytes() == src.window(LIOBN).view.dense().tobytes()
    assert dst.hw_tables(LIOBN)[0].read(rx.ioba >> 12) != src.hw_tables(LIOBN)[0].read(
        rx.ioba >> 12
    )
    dst.dma_write(LIOBN, rx.ioba + 100, b"after")
    assert dst_vm.ram.read(0x100000 + 100, 5) == b"after"
    assert dst.dma_read(LIOBN, tx.ioba, 4) == dst_vm.ram.read(0x200000, 4)
    src_vm.close()
    dst_vm.close()
