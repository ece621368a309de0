"""TCE hypercall throughput: vectorised (numpy) bulk paths against the per-entry loop.

Measures, in one run and on the same model:

* H_PUT_TCE_INDIRECT with 512 entries (one full list page), repeated over a 1 GiB window
  with 4 KiB IOMMU pages, every entry mapping guest RAM (READ|WRITE);
* H_STUFF_TCE clearing the whole 1 GiB window (262,144 mapped entries).

Each is timed with ``kvm.vectorised`` on (numpy) and off (the straightforward per-entry
loop of the kernel's algorithm), and both runs must leave identical hardware tables.
Prints JSON: TCEs per second for each path and the speed-ups.

    PYTHONPATH=src python benchmarks/tce_throughput.py [--lists 128]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from vmferry.hw.spapr.hcall import Hcall, HRet
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec
from vmferry.hw.spapr.tce import TCE_PCI_READ, TCE_PCI_WRITE, encode_tce_list
from vmferry.testing.memory import ByteMemory

LIOBN = 0x80000000
WINDOW = 1 << 30
RAM = 64 << 20
LIST = 0x10000
RW = TCE_PCI_READ | TCE_PCI_WRITE


def build() -> SpaprIommu:
    return SpaprIommu(ByteMemory(RAM), [WindowSpec(LIOBN, 0, WINDOW, 12)], hw_page_shift=12)


def fill(io: SpaprIommu, lists: int) -> float:
    """Map ``lists`` x 512 entries; returns the elapsed seconds of the hypercalls only."""
    elapsed = 0.0
    for n in range(lists):
        first = n * 512
        gpas = (np.arange(first, first + 512, dtype=np.uint64) << np.uint64(12)) % np.uint64(RAM)
        io.memory.write(LIST, encode_tce_list(gpas | np.uint64(RW)))
        start = time.perf_counter()
        ret = io.hcall(Hcall.H_PUT_TCE_INDIRECT, LIOBN, first << 12, LIST, 512).ret
        elapsed += time.perf_counter() - start
        assert ret == HRet.H_SUCCESS, ret
    return elapsed


def stuff(io: SpaprIommu) -> float:
    start = time.perf_counter()
    ret = io.hcall(Hcall.H_STUFF_TCE, LIOBN, 0, 0, WINDOW >> 12).ret
    elapsed = time.perf_counter() - start
    assert ret == HRet.H_SUCCESS, ret
    return elapsed


def run(vectorised: bool, lists: int) -> tuple[float, float, bytes]:
    io = build()
    io.kvm.vectorised = vectorised
    t_indirect = fill(io, lists)
    table = io.hw_tables(LIOBN)[0]
    mapped_state = table.tces.tobytes()
    io.kvm.vectorised = True  # map the rest of the window quickly, untimed
    for n in range(lists, (WINDOW >> 12) // 512):
        first = n * 512
        gpas = (np.arange(first, first + 512, dtype=np.uint64) << np.uint64(12)) % np.uint64(RAM)
        io.memory.write(LIST, encode_tce_list(gpas | np.uint64(RW)))
        io.hcall(Hcall.H_PUT_TCE_INDIRECT, LIOBN, first << 12, LIST, 512)
    assert io.mm.regions[0].mapped == 1 + (WINDOW >> 12)
    io.kvm.vectorised = vectorised
    t_stuff = stuff(io)
    assert not table.tces.any() and io.mm.regions[0].mapped == 1
    return t_indirect, t_stuff, mapped_state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lists", type=int, default=64, help="512-entry lists to time")
    args = parser.parse_args()
    entries = args.lists * 512
    total = WINDOW >> 12
    v_ind, v_stuff, v_state = run(True, args.lists)
    l_ind, l_stuff, l_state = run(False, args.lists)
    assert v_state == l_state, "vectorised and per-entry paths disagree"
    result = {
        "window_bytes": WINDOW,
        "iommu_page": 4096,
        "put_tce_indirect": {
            "lists": args.lists,
            "entries_per_list": 512,
            "vectorised_tces_per_s": round(entries / v_ind),
            "loop_tces_per_s": round(entries / l_ind),
            "speedup": round(l_ind / v_ind, 1),
        },
        "stuff_tce": {
            "entries": total,
            "vectorised_tces_per_s": round(total / v_stuff),
            "loop_tces_per_s": round(total / l_stuff),
            "speedup": round(l_stuff / v_stuff, 1),
        },
        "target_speedup": 10,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
