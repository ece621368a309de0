"""What one read of KVM's dirty log costs a migration pass: the dirty ring against the bitmap.

For each dirty-tracking mode (``get``: KVM_GET_DIRTY_LOG, ``manual-protect``: GET + CLEAR,
``ring``: KVM_CAP_DIRTY_LOG_RING_ACQ_REL), one real x86-64 guest of ``--memory-mib`` MiB
(default 2 GiB) and two vCPUs: the guest runs for a while at a given dirty rate, stops,
and the VMM reads the dirty log once, the way a pre-copy pass does
(``KvmGuestRam.get_dirty_log``: KVM's part plus the page bitmap the engine takes;
``ioctl_ms`` is the time inside KVM's ioctls: GET_DIRTY_LOG, CLEAR_DIRTY_LOG,
RESET_DIRTY_RINGS).
Three levels: nothing dirty (the cost of a pass over a quiet guest), a light and a heavy
writer.  Each read is timed ``--rounds`` times; medians are reported, with the cost per
dirty page and the ratio of each mode against ``get`` (the baseline, measured in the
same run).

    PYTHONPATH=src python benchmarks/dirty_tracking.py [--memory-mib 2048] [--rounds 5]

Prints one JSON object.  Needs a usable /dev/kvm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any

from vmferry.host.vcpus import VcpuThreads, install_kick_handler
from vmferry.hw.x86.kvm import kvm_usable
from vmferry.machine.vm import HostContext, create_vm
from vmferry.machine.x86 import X86Vm

MODES = ("get", "manual-protect", "ring")
#: (label, guest dirty rate in MB/s, seconds the guest runs before the read)
LEVELS = (("clean", 0.0, 0.05), ("light", 10.0, 0.2), ("heavy", 200.0, 0.6))


def measure(mode: str, memory_mib: int, rounds: int) -> dict[str, Any]:
    vm = create_vm({"name": f"bench-{mode}", "arch": "x86_64", "memory_mib": memory_mib,
                    "vcpus": 2, "dirty_log": mode,
                    "workload": {"dirty_rate_mbps": 0, "pattern": "uniform"}},
                   HostContext(vcpu_threads=VcpuThreads))
    assert isinstance(vm, X86Vm)
    out: dict[str, Any] = {"mode": mode, "tracking": vm.ram.dirty_tracking}
    # time the ioctls themselves too: where KVM's share of a read ends
    kvm_vm = vm.kram.kvm_vm
    assert kvm_vm is not None
    in_kvm = [0.0]

    def timed(name: str) -> None:
        real = getattr(kvm_vm, name)

        def wrapper(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*args)
            finally:
                in_kvm[0] += time.perf_counter() - t0

        setattr(kvm_vm, name, wrapper)

    for name in ("get_dirty_log", "clear_dirty_log", "reset_dirty_rings"):
        timed(name)
    try:
        vm.start()
        time.sleep(0.2)
        vm.pause()
        vm.ram.start_dirty_log()
        for label, rate, seconds in LEVELS:
            vm.definition = dataclasses.replace(vm.definition, workload=dataclasses.replace(
                vm.definition.workload, dirty_rate_mbps=rate))
            vm.write_mailbox()  # the guest paces itself from the rate in its mailbox
            times, pages, ioctls = [], [], []
            for _ in range(rounds):
                vm.start()
                time.sleep(seconds)
                vm.pause()
                in_kvm[0] = 0.0
                t0 = time.perf_counter()
                log = vm.ram.get_dirty_log()
                times.append((time.perf_counter() - t0) * 1000)
                ioctls.append(in_kvm[0] * 1000)
                pages.append(log.count)
            ms = statistics.median(times)
            dirty = statistics.median(pages)
            out[label] = {"read_ms": round(ms, 3), "ioctl_ms": round(statistics.median(ioctls), 3),
                          "dirty_pages": int(dirty),
                          "us_per_dirty_page": round(ms * 1000 / dirty, 3) if dirty else None,
                          "runs_ms": [round(t, 3) for t in times]}
        if mode == "ring":
            out["ring_full_exits"] = vm.kram.ring_full_exits
    finally:
        vm.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mib", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    usable, why = kvm_usable()
    if not usable:
        print(json.dumps({"skipped": why}))
        sys.exit(0)
    install_kick_handler()
    results = {m: measure(m, args.memory_mib, args.rounds) for m in MODES}
    base = results["get"]
    ratios = {
        m: {label: round(r[label]["read_ms"] / base[label]["read_ms"], 3)
            for label, _, _ in LEVELS if base[label]["read_ms"]}
        for m, r in results.items() if m != "get"
    }
    print(json.dumps({"memory_mib": args.memory_mib, "vcpus": 2, "rounds": args.rounds,
                      "results": results, "read_ms_vs_get": ratios}, indent=1))


if __name__ == "__main__":
    main()
