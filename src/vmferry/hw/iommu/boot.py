"""Boot-time probe of a host's IOMMUs and DMA masters, concurrently, as a real boot would.

:func:`boot_probe` builds the host device tree's IOMMU instances and client devices from a
platform description, then runs both entry points at once -- every IOMMU driver registering
its instance (``iommu_device_register``, bus walk, deferred-probe trigger) and every client
driver binding with deferred retries -- under a seeded random schedule on the scheduler
core (:func:`vmferry.sched.run_random`; the explorer, which enumerates schedules, lives in
``analysis``, which hosts may not import); the same seed gives the same boot.

The result gives every device its IOMMU group (device assignment uses these) and, for
every device that did not end up usable, the reason.

Platform description (a mapping, e.g. parsed from a host profile)::

    {"iommus": [{"name": "smmu0", "cells": 1, "group_policy": "generic"}],
     "bridges": [{"name": "pcie0", "iommu_map": [[0, "smmu0", 0, 65536]], "ats": true}],
     "devices": [{"name": "uart0", "iommus": [["smmu0", 3]], "driver": "pl011"},
                 {"name": "0000:01:00.0", "bus": "pci", "bridge": "pcie0", "rid": 256,
                  "driver": "vfio-pci", "driver_managed_dma": true}]}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmferry.hw.iommu.core import Device, device_state
from vmferry.hw.iommu.driver_core import Driver
from vmferry.hw.iommu.drivers import GROUP_POLICIES, SmmuDriver
from vmferry.hw.iommu.dt import DtNode
from vmferry.hw.iommu.errors import Errno, IommuError, errname
from vmferry.hw.iommu.kernel import Kernel
from vmferry.hw.iommu.topology import IommuHandle, iommu, register_and_trigger
from vmferry.sched import ModelThread, Scheduler, hazard, run_random

MAX_BOOT_STEPS = 200_000


@dataclass(frozen=True)
class DeviceReport:
    name: str
    state: str
    group: int | None
    dma_ops: str | None
    bound: bool


@dataclass(frozen=True)
class BootResult:
    """What a host learns from probing its IOMMUs at start."""

    mode: str
    seed: int
    #: device name -> IOMMU group id (None: not behind an IOMMU or not probed)
    groups: dict[str, int | None]
    devices: dict[str, DeviceReport]
    #: device name -> why it is unusable for assignment
    failures: dict[str, str]
    #: IOMMU instance name -> registration result (0 or -errno)
    iommus: dict[str, int]
    warnings: tuple[tuple[str, str], ...]
    steps: int
    #: a hazard the model raised during boot (faulty modes), as "hazard: message"
    hazard: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures and self.hazard is None


def boot_probe(
    platform_description: Mapping[str, Any], mode: str = "v6_15", seed: int = 0
) -> BootResult:
    """Probe the described platform concurrently under seeded schedule ``seed``.

    Raises IommuError(EINVAL) for a malformed description (nothing is probed then).
    """
    kernel = Kernel(mode, checks=frozenset())
    handles, devices, wanted = _build(kernel, platform_description)
    threads: dict[str, Callable[[], int]] = {}
    for handle in handles.values():
        threads[f"reg:{handle.name}"] = _registration(kernel, handle)
    for dev, drv in devices:
        threads[f"bind:{dev.name}"] = _binding(kernel, dev, drv)
    runner = run_random(threads, seed, max_steps=MAX_BOOT_STEPS)
    return _result(kernel, mode, seed, handles, devices, wanted, runner, hazard(runner))


# --- building the platform ------------------------------------------------------------------


def _build(
    kernel: Kernel, desc: Mapping[str, Any]
) -> tuple[dict[str, IommuHandle], list[tuple[Device, Driver | None]], dict[str, bool]]:
    handles = {h.name: h for h in (_iommu(spec) for spec in _list(desc, "iommus"))}
    bridges = {b.name: b for b in (_bridge(spec, handles) for spec in _list(desc, "bridges"))}
    devices: list[tuple[Device, Driver | None]] = []
    wanted: dict[str, bool] = {}
    for spec in _list(desc, "devices"):
        dev, drv, behind = _device(spec, handles, bridges)
        kernel.place(dev, "pci" if dev.pci_rid is not None else "platform")
        devices.append((dev, drv))
        wanted[dev.name] = behind
    return handles, devices, wanted


def _list(desc: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    items = desc.get(key, [])
    if not isinstance(items, Sequence) or not all(isinstance(i, Mapping) for i in items):
        raise IommuError(Errno.EINVAL, f"platform description: {key!r} must be a list of tables")
    return list(items)


def _name(spec: Mapping[str, Any], what: str) -> str:
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise IommuError(Errno.EINVAL, f"platform description: a {what} needs a name")
    return name


def _iommu(spec: Mapping[str, Any]) -> IommuHandle:
    name = _name(spec, "iommu")
    policy = spec.get("group_policy", "generic")
    cells = spec.get("cells", 1)
    if policy not in GROUP_POLICIES or not isinstance(cells, int) or not 0 <= cells <= 16:
        raise IommuError(Errno.EINVAL, f"iommu {name}: bad cells or group_policy")
    return iommu(name, cells=cells, driver=SmmuDriver(f"{name}-driver", group_policy=policy),
                 status=str(spec.get("status", "okay")))


def _bridge(spec: Mapping[str, Any], handles: Mapping[str, IommuHandle]) -> DtNode:
    name = _name(spec, "bridge")
    entries = []
    for entry in spec.get("iommu_map", []):
        if not (isinstance(entry, Sequence) and len(entry) == 4 and entry[1] in handles):
            raise IommuError(Errno.EINVAL, f"bridge {name}: bad iommu-map entry {entry!r}")
        base, target, out_base, length = entry
        entries.append((int(base), handles[target].node, int(out_base), int(length)))
    props: dict[str, object] = {"iommu-map": entries}
    if spec.get("ats"):
        props["ats-supported"] = True
    return DtNode(name, props)


def _device(
    spec: Mapping[str, Any], handles: Mapping[str, IommuHandle], bridges: Mapping[str, DtNode]
) -> tuple[Device, Driver | None, bool]:
    name = _name(spec, "device")
    drv_name = spec.get("driver")
    drv = Driver(str(drv_name), bool(spec.get("driver_managed_dma"))) if drv_name else None
    if spec.get("bus", "platform") == "pci":
        bridge = bridges.get(str(spec.get("bridge")))
        rid = spec.get("rid")
        if bridge is None or not isinstance(rid, int):
            raise IommuError(Errno.EINVAL, f"pci device {name}: needs a known bridge and a rid")
        dev = Device(name, pci_rid=rid, host_bridge=bridge, alias_group=spec.get("alias_group"))
        return dev, drv, bool(bridge.props.get("iommu-map"))
    cells: list[object] = []
    for ref in spec.get("iommus", []):
        if not (isinstance(ref, Sequence) and ref and ref[0] in handles):
            raise IommuError(Errno.EINVAL, f"device {name}: bad iommus entry {ref!r}")
        cells += [handles[ref[0]].node, *(int(c) for c in ref[1:])]
    props: dict[str, object] = {"iommus": cells} if cells else {}
    return Device(name, of_node=DtNode(name, props)), drv, bool(cells)


# --- threads ------------------------------------------------------------------------------------


def _registration(kernel: Kernel, handle: IommuHandle) -> Callable[[], int]:
    return lambda: register_and_trigger(kernel, handle)


def _binding(kernel: Kernel, dev: Device, drv: Driver | None) -> Callable[[], int]:
    if drv is None:
        return lambda: 0
    return lambda: kernel.drivers.probe_until_bound(dev, drv)


# --- result ---------------------------------------------------------------------------------------


def _result(
    kernel: Kernel, mode: str, seed: int, handles: Mapping[str, IommuHandle],
    devices: list[tuple[Device, Driver | None]], wanted: Mapping[str, bool],
    runner: Scheduler[ModelThread], hazard: str | None,
) -> BootResult:
    reports: dict[str, DeviceReport] = {}
    groups: dict[str, int | None] = {}
    failures: dict[str, str] = {}
    stuck = set(runner.stuck())
    for dev, drv in devices:
        group = dev.iommu_group.id if dev.iommu_group is not None else None
        groups[dev.name] = group
        reports[dev.name] = DeviceReport(
            dev.name, device_state(dev), group, dev.dma_ops, dev.bound
        )
        reason = _failure_reason(dev, drv, wanted[dev.name], f"bind:{dev.name}" in stuck,
                                 _returned(runner, f"bind:{dev.name}"), hazard)
        if reason:
            failures[dev.name] = reason
    regs = {}
    for name in handles:
        ret = _returned(runner, f"reg:{name}")
        regs[name] = -Errno.EPROBE_DEFER if ret is None else ret
    return BootResult(mode, seed, groups, reports, failures, regs, tuple(kernel.warnings),
                      len(runner.schedule), hazard)


def _returned(runner: Scheduler[ModelThread], name: str) -> int | None:
    """What thread ``name`` returned, or None if it did not return."""
    thread = runner.threads[name]
    if thread.error is not None or name in runner.stuck():
        return None
    return int(thread.result)


def _failure_reason(
    dev: Device, drv: Driver | None, behind_iommu: bool, stuck: bool, ret: int | None,
    hazard: str | None,
) -> str:
    state = device_state(dev)
    if hazard is not None and state not in ("S0", "S5"):
        return f"probe crashed ({hazard}); device left in {state}"
    if stuck and hazard is not None:
        return f"boot aborted by a probe crash ({hazard}) before its driver bound"
    if stuck:
        return "client driver deferred: waiting for an IOMMU that never became ready " \
               "(-EPROBE_DEFER)"
    if drv is not None and ret is not None and ret < 0:
        return f"client driver probe failed: {errname(ret)}"
    if behind_iommu and state != "S5":
        return f"not probed by its IOMMU (state {state})"
    return ""
