"""A VM as a composition of guest RAM, vCPUs, a workload and migratable components."""

from vmferry.machine.handlers import (
    Component,
    ComponentData,
    DeviceData,
    DevicePhase,
    MigrationHandler,
)
from vmferry.machine.ram import DirtyLog, GuestRam
from vmferry.machine.vcpu import Vcpu, VcpuState
from vmferry.machine.vm import VM, HostContext, VmDefinition, create_vm, load_definition

__all__ = [
    "VM",
    "Component",
    "ComponentData",
    "DeviceData",
    "DevicePhase",
    "DirtyLog",
    "GuestRam",
    "HostContext",
    "MigrationHandler",
    "Vcpu",
    "VcpuState",
    "VmDefinition",
    "create_vm",
    "load_definition",
]

# Architectures beyond "generic" register themselves in ARCHES when imported, and
# definition features (VFIO ``devices``) in FEATURES.
from vmferry.machine import arm64_handler as _arm64  # noqa: F401
from vmferry.machine import pseries as _pseries  # noqa: F401
from vmferry.machine import vfio as _vfio  # noqa: F401
from vmferry.machine import x86 as _x86  # noqa: F401
