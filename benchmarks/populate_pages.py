"""Which pages a destination should populate guest RAM in: 4 KiB or transparent huge pages.

Prints one JSON object.  For each backing (``MADV_HUGEPAGE``, ``MADV_NOHUGEPAGE``) on a
fresh anonymous region of ``--mib`` (default 1024) it measures, alternated ``--runs``
times:

* ``populate``: ``madvise(MADV_POPULATE_WRITE)`` over the whole region, as the
  destination's populator does ahead of the stream;
* ``first_touch``: 4 MiB copies into the region, as a receiver without a populator pays;
* ``copy_populated``: the same copies into memory populated beforehand (what the receiver
  pays once the populator ran ahead of it).

Rates are GB/s, medians over the runs.

    python benchmarks/populate_pages.py [--mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time

import numpy as np

from vmferry.host.populate import populate_write

MIB = 1024 * 1024


def one(size: int, huge: bool, what: str) -> float:
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    view = np.frombuffer(region, dtype=np.uint8)
    src = np.random.default_rng(1).integers(0, 255, 4 * MIB, dtype=np.uint8)
    if what == "copy_populated":
        if populate_write(view.ctypes.data, size):
            raise OSError("MADV_POPULATE_WRITE not supported")
    t0 = time.perf_counter()
    if what == "populate":
        if populate_write(view.ctypes.data, size):
            raise OSError("MADV_POPULATE_WRITE not supported")
    else:
        for off in range(0, size, 4 * MIB):
            view[off : off + 4 * MIB] = src
    seconds = time.perf_counter() - t0
    del view
    region.close()
    return size / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = args.mib * MIB
    kinds = ("populate", "first_touch", "copy_populated")
    rates: dict[str, dict[str, list[float]]] = {
        b: {k: [] for k in kinds} for b in ("MADV_HUGEPAGE", "MADV_NOHUGEPAGE")}  # fmt: skip
    for _ in range(args.runs):
        for kind in kinds:
            for backing in rates:
                rates[backing][kind].append(one(size, backing == "MADV_HUGEPAGE", kind))
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    report = {
        "region_mib": args.mib,
        "runs": args.runs,
        "thp_enabled": thp,
        "load_average": os.getloadavg(),
        "gb_per_s": {b: {k: [round(x, 3) for x in v] for k, v in r.items()}
                     for b, r in rates.items()},  # fmt: skip
        "median_gb_per_s": {b: {k: round(statistics.median(v), 3) for k, v in r.items()}
                            for b, r in rates.items()},  # fmt: skip
    }
    med = report["median_gb_per_s"]
    report["populate_4k_over_thp"] = round(
        med["MADV_NOHUGEPAGE"]["populate"] / med["MADV_HUGEPAGE"]["populate"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
