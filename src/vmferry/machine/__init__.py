"""A VM as a composition of guest RAM, vCPUs, a workload and migratable components."""

from vmferry.machine.ram import DirtyLog, GuestRam
from vmferry.machine.vcpu import Vcpu, VcpuState
from vmferry.machine.vm import VM, Component, VmDefinition, create_vm, load_definition

__all__ = [
    "VM",
    "Component",
    "DirtyLog",
    "GuestRam",
    "Vcpu",
    "VcpuState",
    "VmDefinition",
    "create_vm",
    "load_definition",
]
