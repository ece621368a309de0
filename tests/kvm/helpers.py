"""Helpers for tests on real KVM guests."""

from __future__ import annotations

import os
import time
from typing import Any

from vmferry.host.vcpus import VcpuThreads
from vmferry.machine.vm import HostContext, create_vm
from vmferry.machine.x86 import X86Vm


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def host(platform: dict[str, Any] | None = None) -> HostContext:
    return HostContext(vcpu_threads=VcpuThreads, platform=platform or {})


def x86_vm(name: str = "k", mib: int = 16, vcpus: int = 1, rate: float = 10.0,
           pattern: str = "uniform", platform: dict[str, Any] | None = None,
           **extra: Any) -> X86Vm:
    vm = create_vm({"name": name, "arch": "x86_64", "memory_mib": mib, "vcpus": vcpus,
                    "workload": {"dirty_rate_mbps": rate, "pattern": pattern}, **extra},
                   host(platform))
    assert isinstance(vm, X86Vm)
    return vm


def wait_progress(vm: X86Vm, beyond: int, timeout: float = 10.0) -> int:
    """Wait until the guest's summed progress exceeds ``beyond``; return it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = sum(c for c, _ in vm.progress())
        if p > beyond:
            return p
        time.sleep(0.01)
    raise AssertionError(f"guest progress stuck at {beyond}: {vm.guest_info()}")
