"""What a VM definition may make this host allocate, checked before anything is.

A definition's memory, vCPUs, device state and TCE tables are compared with what the host
really has -- ``MemAvailable`` from ``/proc/meminfo`` and ``os.cpu_count()`` -- and with the
definition format's maxima.  A VM that does not fit is refused with HTTP 422 and the kind
``VmTooLarge``, naming what it needs and what the host has.  Guest RAM is mapped lazily,
so several VMs may together promise more than the host holds (as KVM allows); one VM
larger than all the host has free cannot run and is refused.
"""

from __future__ import annotations

import os

from vmferry.errors import ApiError
from vmferry.host.models import VmDefinitionModel

MIB = 1024 * 1024
#: vCPUs a host runs per CPU at most (over-commit, as KVM allows)
VCPUS_PER_CPU = 16
#: the most of the free memory a VM's TCE tables may take
TCE_SHARE = 0.25
TCE_ENTRY_BYTES = 8


def memory_available_mib() -> int:
    """The host's available memory (``MemAvailable``), in MiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages // MIB)


def host_cpus() -> int:
    return os.cpu_count() or 1


def too_large(host: str, vm: str, what: str) -> ApiError:
    return ApiError(422, f"VM {vm} is too large for host {host}: {what}", "VmTooLarge")


def check_fits(model: VmDefinitionModel, host: str, available_mib: int | None = None,
               cpus: int | None = None) -> None:
    """ApiError 422 ``VmTooLarge`` if the VM needs more than the host has."""
    free = memory_available_mib() if available_mib is None else available_mib
    ncpu = host_cpus() if cpus is None else cpus
    if model.memory_mib > free:
        raise too_large(host, model.name, f"it needs {model.memory_mib} MiB of memory and "
                                          f"the host has {free} MiB available")
    if model.vcpus > VCPUS_PER_CPU * ncpu:
        raise too_large(host, model.name, f"{model.vcpus} vCPUs on a host with {ncpu} CPUs "
                                          f"(at most {VCPUS_PER_CPU} per CPU)")
    state = sum(d.state_mib or 0 for d in model.devices)
    if model.memory_mib + state > free:
        raise too_large(host, model.name, f"its memory and device state need "
                                          f"{model.memory_mib + state:.0f} MiB and the host "
                                          f"has {free} MiB available")
    tce = sum((w.size_mib * MIB >> w.page_shift) * TCE_ENTRY_BYTES for w in model.tce_windows)
    if tce > TCE_SHARE * free * MIB:
        raise too_large(host, model.name, f"its TCE windows need {tce / MIB:.0f} MiB of "
                                          f"tables, more than {TCE_SHARE:.0%} of the host's "
                                          f"{free} MiB available")
