"""pseries migration costs: the destination's TCE rebuild and the DMA-dirty rule.

Measures, in one run:

* **rebuild**: ``SpaprIommu.restore`` (post_load + explicit replay into the destination's
  hardware tables, docs/models/spapr-tce.md §9.3) of a guest view with N mapped 64 KiB entries, in entries
  per second -- this runs inside the downtime -- vectorised against the per-entry replay
  (both must leave identical tables), and against the source mapping the same entries
  with H_PUT_TCE_INDIRECT;
* **pre-copy**: an in-process migration (real clock) of a pseries VM whose DMA devices
  keep writing during pre-copy, against the same VM without devices: RAM pages sent,
  passes and the wall time of the whole migration (the WRITE-mapped pages count as dirty
  on every pass, docs/models/spapr-tce.md §9.3 point 4).

    PYTHONPATH=src python benchmarks/pseries_migration.py [--entries 8192]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from vmferry.host.clocks import MonotonicClock
from vmferry.hw.spapr.hcall import Hcall, HRet
from vmferry.hw.spapr.hostmem import HostMemoryMap
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec
from vmferry.hw.spapr.tce import TCE_PCI_READ, TCE_PCI_WRITE, encode_tce_list
from vmferry.machine import VM, HostContext, create_vm
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import StreamDecoder
from vmferry.testing.memory import ByteMemory

LIOBN = 0x80000000
RAM = 1 << 30
SHIFT = 16
LIST = 0x10000


def _iommu(hpa_base: int) -> SpaprIommu:
    host = HostMemoryMap.for_ram(RAM, hpa_base=hpa_base, ua_base=hpa_base << 1)
    window = WindowSpec(LIOBN, 0, RAM, SHIFT)
    return SpaprIommu(ByteMemory(RAM), [window], hw_page_shift=SHIFT, host=host)


def rebuild(entries: int) -> dict[str, Any]:
    src = _iommu(0x1000_0000_0000)
    gpas = (np.arange(entries, dtype=np.uint64) << np.uint64(SHIFT)) % np.uint64(RAM)
    tces = gpas | np.uint64(TCE_PCI_READ | TCE_PCI_WRITE)
    t0 = time.perf_counter()
    for first in range(0, entries, 512):
        src.memory.write(LIST, encode_tce_list(tces[first : first + 512]))
        n = min(512, entries - first)
        ret = src.hcall(Hcall.H_PUT_TCE_INDIRECT, LIOBN, first << SHIFT, LIST, n).ret
        assert ret == HRet.H_SUCCESS, ret
    t_map = time.perf_counter() - t0
    state = src.save()
    dst = _iommu(0x3000_0000_0000)
    t0 = time.perf_counter()
    report = dst.restore(state)
    t_rebuild = time.perf_counter() - t0
    assert report.mapped == entries and report.cleared == 0
    dst.check_invariants()
    loop = _iommu(0x3000_0000_0000)
    loop.kvm.vectorised = False  # the per-entry replay (VFIO map per entry)
    t0 = time.perf_counter()
    assert loop.restore(state) == report
    t_loop = time.perf_counter() - t0
    assert all(
        np.array_equal(a.tces, b.tces)
        for a, b in zip(dst.hw_tables(LIOBN), loop.hw_tables(LIOBN), strict=True)
    )
    return {
        "rebuild_per_entry_s": round(t_loop, 4),
        "rebuild_speedup_vs_per_entry": round(t_loop / t_rebuild, 1),
        "entries": entries,
        "hcall_map_s": round(t_map, 4),
        "rebuild_s": round(t_rebuild, 4),
        "hcall_map_entries_per_s": round(entries / t_map),
        "rebuild_entries_per_s": round(entries / t_rebuild),
        "rebuild_vs_hcall_map": round(t_rebuild / t_map, 2),
        "rebuild_ms_per_1000_entries": round(t_rebuild / entries * 1e6, 2),
    }


def _definition(devices: bool) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "bench",
        "arch": "pseries",
        "memory_mib": 256,
        "vcpus": 2,
        "fill": "random",
        "workload": {"dirty_rate_mbps": 40, "seed": 3},
        "tce_windows": [{"liobn": LIOBN, "offset": 0, "size_mib": 1024, "page_shift": 16}],
    }
    if devices:
        d["dma_devices"] = [
            {"name": f"nic{i}", "liobn": LIOBN, "buffers": 64, "rate_mbps": 20} for i in range(2)
        ]
    return d


def migrate(devices: bool) -> dict[str, Any]:
    src = create_vm(_definition(devices), HostContext("src"))
    src.start()
    for _ in range(20):
        src.run_slice(0.01)
    clock = MonotonicClock()
    source = SourceSession(src, MigrationParams(), clock)
    decoder = StreamDecoder()

    def factory(d: Mapping[str, Any]) -> VM:
        return create_vm(d, HostContext("dst"))

    dest = DestinationSession(clock, factory=factory)
    last = time.perf_counter()

    def push(bufs: list[Any]) -> None:
        nonlocal last
        for b in bufs:
            decoder.feed(b)
        for rec in decoder.events():
            dest.receive(rec)
        now = time.perf_counter()
        src.run_slice(now - last)  # guest and devices run in real time during pre-copy
        last = now

    t0 = time.perf_counter()
    push(source.start())
    while bufs := source.next_buffers():
        push(bufs)
    decoder.eof()
    stats = source.complete(dest.finish())
    elapsed = time.perf_counter() - t0
    assert dest.vm is not None
    out = {
        "pages_sent": stats.ram_normal + stats.ram_duplicate,
        "passes": len(stats.passes),
        "downtime_ms": round(stats.downtime.total_ms, 1),
        "elapsed_s": round(elapsed, 3),
    }
    if devices:
        post = dest.vm.handlers["spapr-tce"].post_load()
        out["rebuild"] = post["rebuild"]["mapped"]
    src.close()
    dest.vm.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=8192)
    args = parser.parse_args()
    # best of three: the figures are wall time on a shared machine
    plain = min((migrate(False) for _ in range(3)), key=lambda r: r["elapsed_s"])
    dma = min((migrate(True) for _ in range(3)), key=lambda r: r["elapsed_s"])
    print(
        json.dumps(
            {
                "rebuild": rebuild(args.entries),
                "precopy": {
                    "without_devices": plain,
                    "with_dma_devices": dma,
                    "pages_sent_ratio": round(dma["pages_sent"] / plain["pages_sent"], 3),
                    "elapsed_ratio": round(dma["elapsed_s"] / plain["elapsed_s"], 3),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
