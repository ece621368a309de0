"""What the pseries device tree adds to a migration, by guest size.

For pseries VMs of growing memory (one ``ibm,dynamic-memory`` LMB entry per 256 MiB) and
vCPU count (one CPU node each), between two hosts whose ``[lpm]`` platforms differ (NUMA
domain, cache geometry, facility properties), measures through the handler's real hooks:

* **record**: size of the ``pseries-dt`` component record and the time to save it
  (inside the source's stop-and-copy);
* **load**: decode + rebuild of the guest tree on the destination (the baseline, inside
  the downtime before COMMIT);
* **update**: the post-migration update sequence at ``vm_start`` (after COMMIT, before the
  vCPUs run: it lengthens resume), with the number of nodes and properties it changed,
  and its ratio to the load.

    PYTHONPATH=src python benchmarks/lpm_migration.py
"""

from __future__ import annotations

import json
import time
from typing import Any

from vmferry.machine import HostContext, create_vm
from vmferry.machine.handlers import ComponentData
from vmferry.machine.pseries_dt import device_tree_handler

A = HostContext("A", platform={"lpm": {"numa_domain": 0}})
B = HostContext("B", platform={"lpm": {"numa_domain": 1, "l2_size": 1 << 20,
                                       "shared_interrupt_pool": 0xFFFFFFF1}})
SIZES = ((1024, 4), (2048, 64), (2048, 256), (2048, 512))


def one(memory_mib: int, vcpus: int) -> dict[str, Any]:
    d = {"name": "bench", "arch": "pseries", "memory_mib": memory_mib, "vcpus": vcpus}
    src, dst = create_vm(d, A), create_vm(d, B)
    try:
        hs, hd = device_tree_handler(src), device_tree_handler(dst)
        t0 = time.perf_counter()
        (piece,) = hs.save_complete()
        t1 = time.perf_counter()
        assert isinstance(piece, ComponentData)
        hd.load(piece)
        hd.load_complete()
        t2 = time.perf_counter()
        hd.vm_start()
        t3 = time.perf_counter()
        rep = hd.post_load()
        assert rep["ok"], rep
        load_ms, update_ms = (t2 - t1) * 1e3, (t3 - t2) * 1e3
        return {
            "memory_mib": memory_mib,
            "vcpus": vcpus,
            "nodes": hd.report()["nodes"],
            "record_bytes": len(piece.data),
            "save_ms": round((t1 - t0) * 1e3, 3),
            "load_ms": round(load_ms, 3),
            "update_ms": round(update_ms, 3),
            "update_vs_load": round(update_ms / load_ms, 2),
            "nodes_changed": len(rep["nodes_changed"]),
            "properties_changed": len(rep["properties_changed"]),
        }
    finally:
        src.close()
        dst.close()


def main() -> None:
    print(json.dumps({"lpm_migration": [one(m, v) for m, v in SIZES]}, indent=2))


if __name__ == "__main__":
    main()
