"""Conformance checks of docs/models/iommu-probe.md §12, one test per check number."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vmferry.analysis.explore import Instance, Report, explore, run_scenario
from vmferry.analysis.explore.scenarios.iommu_probe import SCENARIO
from vmferry.errors import InvariantViolation
from vmferry.hw.iommu.checks import check_quiescent, leaked_objects
from vmferry.hw.iommu.core import (
    LATE_PROBE_WARNING,
    NOTIFY_DONE,
    NOTIFY_OK,
    NULL_GROUP_WARNING,
    BusAction,
    Device,
    DomainType,
    Module,
    device_state,
)
from vmferry.hw.iommu.driver_core import IGNORING_DEPENDENCY_WARNING, Driver
from vmferry.hw.iommu.drivers import SmmuDriver
from vmferry.hw.iommu.dt import DtNode
from vmferry.hw.iommu.errors import Errno, LockdepError
from vmferry.hw.iommu.fwspec import IOMMU_FWSPEC_PCI_RC_ATS
from vmferry.hw.iommu.kernel import Kernel
from vmferry.hw.iommu.topology import IommuHandle, client, iommu, register, register_and_trigger
from vmferry.testing.explore import assert_hazard

ENODEV, EINVAL, EPROBE_DEFER = -Errno.ENODEV, -Errno.EINVAL, -Errno.EPROBE_DEFER

# --- helpers ------------------------------------------------------------------------------


def ready_x(k: Kernel, name: str = "X", **kw: object) -> IommuHandle:
    handle = iommu(name, **kw)  # type: ignore[arg-type]
    assert register(k, handle) == 0
    return handle


def listed_only(k: Kernel, handle: IommuHandle) -> None:
    """Instance in iommu_device_list, walk not finished (ready still False)."""
    handle.inst.ops, handle.inst.fwnode, handle.inst.listed = handle.driver, handle.node, True
    k.core.device_list.append(handle.inst)


def locked(k: Kernel, fn: Callable[[], int]) -> int:
    k.core.probe_lock.acquire()
    try:
        return fn()
    finally:
        k.core.probe_lock.release()


def fwspec_ids(dev: Device) -> list[int]:
    assert dev.iommu is not None
    ref = dev.iommu.get().fwspec
    assert ref is not None
    return ref.get().ids


def has_fwspec(dev: Device) -> bool:
    return dev.iommu is not None and dev.iommu.get().fwspec is not None


def scenario(case: str, mode: str, **kw: object) -> Report:
    return run_scenario(SCENARIO, mode=mode, case=case, failures_dir=None, **kw)  # type: ignore[arg-type]


def hazards(report: Report) -> set[str]:
    return {f.hazard for f in report.failures}


# --- firmware parsing / fwspec ------------------------------------------------------------


def test_check_1_configure_without_node() -> None:
    k = Kernel()
    dev = k.place(Device("D"))
    assert k.of.configure(dev, None, None) == ENODEV
    assert dev.iommu is None


def test_check_2_node_without_iommus() -> None:
    k = Kernel()
    dev = k.place(client("D"))
    assert k.of.configure(dev, dev.of_node) == ENODEV
    assert dev.iommu is None


def test_check_3_single_id() -> None:
    k = Kernel()
    x = ready_x(k)
    dev = k.place(client("D", (x, 0x42)))
    assert k.of.configure(dev, dev.of_node) == 0
    assert dev.iommu is not None
    fwspec = dev.iommu.get().fwspec
    assert fwspec is not None and fwspec.get().iommu_fwnode is x.node
    assert fwspec.get().num_ids == 1 and fwspec_ids(dev) == [0x42]


def test_check_4_two_ids_reallocate_once() -> None:
    k = Kernel()
    x = ready_x(k)
    dev = k.place(client("D", (x, 23), (x, 24)))
    freed_before = k.heap.frees
    assert k.of.configure(dev, dev.of_node) == 0
    assert fwspec_ids(dev) == [23, 24]
    assert dev.iommu is not None and dev.iommu.get().fwspec is not None
    fwspec = dev.iommu.get().fwspec
    assert fwspec is not None and fwspec.get().num_ids == 2
    assert k.heap.frees - freed_before == 1  # the one-ID fwspec moved exactly once


def test_check_5_disabled_iommu_node() -> None:
    k = Kernel()
    x = iommu("X", status="disabled")
    assert register(k, x) == 0
    dev = k.place(client("D", (x, 1)))
    from vmferry.hw.iommu.dt import PhandleArgs

    assert k.of.xlate(dev, PhandleArgs(x.node, (1,))) == ENODEV
    assert k.of.configure(dev, dev.of_node) == ENODEV
    assert not has_fwspec(dev)


def test_check_6_unregistered_defers() -> None:
    k = Kernel()
    dev = k.place(client("D", (iommu("X"), 1)))
    assert k.of.configure(dev, dev.of_node) == EPROBE_DEFER
    assert dev.iommu is None


def test_check_7_no_modules_initcalls_done() -> None:
    k = Kernel(modules_enabled=False)
    k.drivers.initcalls_done = True
    dev = k.place(client("D", (iommu("X"), 1)))
    assert k.of.configure(dev, dev.of_node) == ENODEV
    assert k.warned(IGNORING_DEPENDENCY_WARNING) == 1
    assert k.of.dma_configure_id(dev, dev.of_node, force_dma=True) == 0
    assert dev.dma_ops == "direct"


def test_check_8_deferred_probe_timeout() -> None:
    k = Kernel()
    k.drivers.timeout_expired = True
    dev = k.place(client("D", (iommu("X"), 1)))
    assert k.of.configure(dev, dev.of_node) == -Errno.ETIMEDOUT
    assert k.of.dma_configure_id(dev, dev.of_node, force_dma=True) == 0
    assert dev.dma_ops == "direct" and dev.iommu is None


def test_check_9_not_ready_defers_even_after_timeout() -> None:
    k = Kernel()
    k.drivers.timeout_expired = True
    x = iommu("X")
    listed_only(k, x)
    dev = k.place(client("D", (x, 1)))
    assert locked(k, lambda: k.core.fwspec_init(dev, x.node)) == EPROBE_DEFER
    assert dev.iommu is None


def test_check_10_not_ready_but_core_probe_in_progress() -> None:
    k = Kernel()
    x = iommu("X")
    listed_only(k, x)
    dev = k.place(client("D", (x, 1)))

    def inside_init_device() -> int:
        assert k.core.dev_iommu_get(dev) is not None
        return k.core.fwspec_init(dev, x.node)

    assert locked(k, inside_init_device) == 0
    assert has_fwspec(dev)


def test_check_11_second_instance_same_or_other_driver() -> None:
    k = Kernel(checks=frozenset())
    shared = SmmuDriver("smmu")
    x = ready_x(k, "X", driver=shared)
    x2 = ready_x(k, "X2", driver=shared)
    other = ready_x(k, "Z")
    dev = k.place(client("D", (x, 1)))
    assert locked(k, lambda: k.core.fwspec_init(dev, x.node)) == 0
    assert locked(k, lambda: k.core.fwspec_init(dev, x2.node)) == 0
    assert dev.iommu is not None
    fwspec = dev.iommu.get().fwspec
    assert fwspec is not None and fwspec.get().iommu_fwnode is x.node
    assert locked(k, lambda: k.core.fwspec_init(dev, other.node)) == EINVAL
    mixed = k.place(client("M", (x, 1), (other, 2)))
    assert k.of.configure(mixed, mixed.of_node) == EINVAL
    assert mixed.iommu is None


def test_check_12_add_ids_without_fwspec() -> None:
    k = Kernel()
    dev = k.place(client("D"))
    assert locked(k, lambda: k.core.fwspec_add_ids(dev, [1])) == EINVAL
    assert dev.iommu is None


def test_check_13_driver_without_of_xlate() -> None:
    k = Kernel()
    x = ready_x(k, driver=SmmuDriver("no-xlate", has_of_xlate=False))
    dev = k.place(client("D", (x, 1)))
    assert k.of.configure(dev, dev.of_node) == ENODEV
    assert not has_fwspec(dev) and dev.iommu is None


@pytest.mark.parametrize("preexisting", [False, True])
def test_check_14_of_xlate_error_on_second_entry(preexisting: bool) -> None:
    k = Kernel()
    x = ready_x(k)
    x.driver.fail_of_xlate[("D", 1)] = EINVAL
    dev = k.place(client("D", (x, 1), (x, 2)))
    if preexisting:
        locked(k, lambda: 0 if k.core.dev_iommu_get(dev) else -1)
    assert k.of.configure(dev, dev.of_node) == EINVAL
    assert not has_fwspec(dev)
    assert (dev.iommu is not None) is preexisting


def test_check_15_existing_fwspec_short_circuits() -> None:
    k = Kernel()
    x = ready_x(k)
    dev = k.place(client("D", (x, 1)))
    assert k.of.configure(dev, dev.of_node) == 0
    calls, probes = dict(x.driver.xlate_calls), x.driver.probe_calls
    assert k.of.configure(dev, dev.of_node) == 0
    assert x.driver.xlate_calls == calls and x.driver.probe_calls == probes


def test_check_16_pci_iommu_map_and_ats() -> None:
    k = Kernel()
    x = ready_x(k)
    bridge = DtNode("pcie", {"iommu-map": [(0x100, x.node, 0x8000, 0x100)],
                             "ats-supported": True})
    dev = k.place(Device("P", pci_rid=0x105, host_bridge=bridge), "pci")
    assert k.of.configure(dev, bridge) == 0
    assert fwspec_ids(dev) == [0x8005]
    assert dev.iommu is not None
    fwspec = dev.iommu.get().fwspec
    assert fwspec is not None and fwspec.get().flags & IOMMU_FWSPEC_PCI_RC_ATS
    other = k.place(Device("Q", pci_rid=0x300, host_bridge=bridge), "pci")
    assert k.of.configure(other, bridge) == ENODEV


def test_check_17_of_dma_configure_error_mapping() -> None:
    k = Kernel()
    dev = k.place(client("D", (iommu("X"), 1)))
    assert k.of.dma_configure_id(dev, dev.of_node, force_dma=True) == EPROBE_DEFER
    assert dev.dma_range_map is None
    plain = k.place(client("P"))
    assert k.of.dma_configure_id(plain, plain.of_node, force_dma=True) == 0
    x = ready_x(k, "Y")
    x.driver.fail_of_xlate[("E", 0)] = EINVAL
    bad = k.place(client("E", (x, 1)))
    assert k.of.dma_configure_id(bad, bad.of_node, force_dma=True) == 0
    assert bad.dma_ops == "direct"


# --- probe path, groups, domains ----------------------------------------------------------


def test_check_18_register_probes_driverless_client() -> None:
    k = Kernel()
    x = iommu("X")
    dev = k.place(client("D", (x, 5)))
    assert register(k, x) == 0
    assert device_state(dev) == "S5" and x.driver.probe_calls == 1
    assert x.inst.ready and dev.dma_ops == "iommu"


def test_check_19_walk_skips_unrelated_device() -> None:
    k = Kernel()
    x = iommu("X")
    other = k.place(client("O", (iommu("Y"), 1)))
    plain = k.place(client("P"))
    assert register(k, x) == 0
    for dev in (other, plain):
        assert device_state(dev) == "S0" and dev.iommu is None


def _pci_pair(k: Kernel, types: tuple[int, int]) -> tuple[IommuHandle, Device, Device]:
    x = iommu("X", driver=SmmuDriver("smmu", group_policy="pci"))
    bridge = DtNode("pcie", {"iommu-map": [(0, x.node, 0, 0x10000)]})
    a = k.place(Device("A", pci_rid=8, host_bridge=bridge, alias_group="bus1"), "pci")
    b = k.place(Device("B", pci_rid=9, host_bridge=bridge, alias_group="bus1"), "pci")
    x.driver.def_types.update({"A": types[0], "B": types[1]})
    return x, a, b


def test_check_20_alias_group_default_domain_once_in_phase2() -> None:
    k = Kernel()
    x, a, b = _pci_pair(k, (0, int(DomainType.IDENTITY)))
    assert register(k, x) == 0
    assert a.iommu_group is b.iommu_group and a.iommu_group is not None
    group = a.iommu_group
    assert group.setup_path == "walk"
    assert group.default_domain is not None
    assert group.default_domain.type is DomainType.IDENTITY
    assert a.dma_ops == b.dma_ops == "direct"


def test_check_21_conflicting_default_domain_types() -> None:
    k = Kernel()
    x, a, _ = _pci_pair(k, (int(DomainType.IDENTITY), int(DomainType.DMA)))
    assert register(k, x) == 0
    assert a.iommu_group is not None and a.iommu_group.default_domain is not None
    assert a.iommu_group.default_domain.type is DomainType.IDENTITY
    assert any("conflicting default domain types" in line for line in k.logs)


def test_check_22_device_group_null() -> None:
    k = Kernel()
    module = Module("smmu")
    x = iommu("X", driver=SmmuDriver("smmu", owner=module, in_module=True))
    x.driver.null_group.add("D")
    dev = k.place(client("D", (x, 1)))
    assert register(k, x) == EINVAL  # the walk stops on it and X unregisters
    assert k.warned(NULL_GROUP_WARNING) == 1
    assert dev.iommu is None and dev.iommu_group is None
    assert x.driver.release_calls == 1 and module.refcount == 0
    assert leaked_objects(k) == []


def test_check_23_probe_device_fails() -> None:
    k = Kernel()
    x = iommu("X")
    x.driver.fail_probe["D"] = -Errno.ENOMEM
    dev = k.place(client("D", (x, 1)))
    assert register(k, x) == -Errno.ENOMEM  # not -ENODEV: the walk stops, X unregisters
    assert dev.iommu is None and x.driver.release_calls == 0


def test_check_24_link_eexist() -> None:
    k = Kernel()
    x = iommu("X")
    x.inst.links.add("D")
    dev = k.place(client("D", (x, 1)))
    assert register(k, x) == -Errno.EEXIST
    assert x.driver.release_calls == 1 and dev.iommu is None and dev.iommu_group is None


def test_check_25_hot_add_after_registration() -> None:
    k = Kernel()
    x = ready_x(k)
    dev = client("D", (x, 1))
    assert k.drivers.device_add(dev, k.buses["platform"]) == NOTIFY_OK
    assert device_state(dev) == "S5"
    assert dev.iommu_group is not None and dev.iommu_group.setup_path == "immediate"
    assert k.drivers.device_add(client("P"), k.buses["platform"]) == NOTIFY_DONE


def test_check_26_probe_of_grouped_device_is_noop() -> None:
    k = Kernel()
    x = iommu("X")
    dev = k.place(client("D", (x, 1)))
    assert register(k, x) == 0
    probes = x.driver.probe_calls
    assert locked(k, lambda: k.core.probe_device_locked(dev, None)) == 0
    assert x.driver.probe_calls == probes


def test_check_27_probe_without_lock_is_lockdep_error() -> None:
    k = Kernel()
    dev = k.place(client("D"))
    with pytest.raises(LockdepError):
        k.core.probe_device_locked(dev, None)
    assert dev.iommu is None


def test_check_28_late_probe_warning_once() -> None:
    k = Kernel()
    x = ready_x(k)
    dev = k.place(client("D", (x, 1)))
    dev.driver = Driver("misuser")  # of_dma_configure called outside bus code
    assert k.of.dma_configure_id(dev, dev.of_node, force_dma=True) == 0
    assert k.warned(LATE_PROBE_WARNING) == 1
    assert device_state(dev) == "S5"


# --- client driver probe ------------------------------------------------------------------


def test_check_29_defer_then_bind_after_registration() -> None:
    k = Kernel()
    x = iommu("X")
    dev = k.place(client("D", (x, 1)))
    drv = Driver("client")
    assert k.drivers.really_probe(dev, drv) == EPROBE_DEFER
    assert dev.driver is None and dev in k.drivers.deferred
    assert register_and_trigger(k, x) == 0
    assert k.drivers.really_probe(dev, drv) == 0
    assert dev.iommu_group is not None and dev.iommu_group.owner_cnt == 1
    assert dev.bound and dev.dma_ops == "iommu" and dev not in k.drivers.deferred


def _grouped_without_domain(k: Kernel) -> Device:
    x = iommu("X")
    listed_only(k, x)
    dev = k.place(client("D", (x, 1)))
    assert locked(k, lambda: k.core.probe_device_locked(dev, [])) == 0
    assert device_state(dev) == "S4"
    return dev


def test_check_30_use_default_domain_without_domain() -> None:
    k = Kernel()
    dev = _grouped_without_domain(k)
    assert k.core.use_default_domain(dev) == EPROBE_DEFER
    assert dev.iommu_group is not None and dev.iommu_group.owner_cnt == 0


def test_check_31_use_default_domain_user_owned() -> None:
    k = Kernel()
    x = iommu("X")
    dev = k.place(client("D", (x, 1)))
    assert register(k, x) == 0
    assert dev.iommu_group is not None
    dev.iommu_group.owner = "vfio"
    assert k.core.use_default_domain(dev) == -Errno.EBUSY
    assert dev.iommu_group.owner_cnt == 0


def test_check_32_driver_managed_dma() -> None:
    k = Kernel()
    x = iommu("X")
    dev = k.place(client("D", (x, 1)))
    assert register(k, x) == 0
    assert k.drivers.really_probe(dev, Driver("vfio-platform", driver_managed_dma=True)) == 0
    assert dev.iommu_group is not None and dev.iommu_group.owner_cnt == 0


def test_check_33_core_dma_configure_never_claims() -> None:
    k = Kernel()
    calls: list[str] = []
    real = k.core.use_default_domain

    def spy(dev: Device) -> int:
        calls.append(dev.name)
        return real(dev)

    k.core.use_default_domain = spy  # type: ignore[method-assign]
    x = iommu("X")
    k.place(client("D", (x, 1)))
    assert register(k, x) == 0
    assert calls == []


# --- removal ------------------------------------------------------------------------------


def test_check_34_removed_device() -> None:
    k = Kernel()
    x = iommu("X")
    dev = k.place(client("D", (x, 1)))
    assert register(k, x) == 0
    group = dev.iommu_group
    assert group is not None
    assert k.core.bus_notifier(BusAction.REMOVED_DEVICE, dev) == NOTIFY_OK
    assert x.driver.release_calls == 1
    assert dev.iommu is None and dev.iommu_group is None
    assert group.devices == [] and group.freed
    assert group.default_domain is None and not k.warned("group released with domains still set")


def test_check_35_remove_never_probed_device_with_fwspec() -> None:
    k = Kernel()
    x = iommu("X")
    listed_only(k, x)
    dev = k.place(client("D", (x, 1)))

    def parsed() -> int:
        assert k.core.dev_iommu_get(dev) is not None
        return k.core.fwspec_init(dev, x.node) or k.core.fwspec_add_ids(dev, [1])

    assert locked(k, parsed) == 0
    k.core.release_device(dev)
    assert dev.iommu is None and x.driver.release_calls == 0
    assert k.heap.live() == []


def test_check_36_unregister_releases_then_unlists() -> None:
    k = Kernel()
    x = iommu("X", driver=SmmuDriver("smmu", group_policy="singleton"))
    devs = [k.place(client(f"D{i}", (x, i))) for i in range(2)]
    assert register(k, x) == 0
    single = x.inst.singleton_group
    assert single is not None and single.refcount == 3
    found: list[bool] = []
    real_release = x.driver.release_device

    def release(kernel: Kernel, dev: Device) -> None:
        found.append(kernel.core.find_instance(x.node) is x.inst)
        real_release(kernel, dev)

    x.driver.release_device = release  # type: ignore[method-assign]
    k.core.device_unregister(x.inst)
    assert found == [True, True]
    assert all(d.iommu is None and d.iommu_group is None for d in devs)
    assert x.inst not in k.core.device_list and single.freed


def test_check_37_after_unregister_defer() -> None:
    k = Kernel()
    x = ready_x(k)
    k.core.device_unregister(x.inst)
    dev = k.place(client("D", (x, 1)))
    assert locked(k, lambda: k.core.fwspec_init(dev, x.node)) == EPROBE_DEFER


# --- concurrency --------------------------------------------------------------------------


def test_check_38_r1_pre_6_7_null_deref() -> None:
    report = scenario("R1", "pre_6_7")
    deref = [f for f in report.failures if f.hazard == "null-deref"]
    assert deref and "dev_iommu_fwspec_set" in deref[0].message
    steps = deref[0].schedule
    # step 7: C resumes at its fwspec allocation and installs through the NULL D.iommu ...
    assert steps[-1] == ("C", "alloc fwspec D")
    # ... after W freed it (steps 3-6) while C sat inside the allocation (step 2)
    got = max(i for i, step in enumerate(steps) if step == ("C", "dev_iommu_get D"))
    assert ("W", "dev_iommu_free D") in steps[got:]


@pytest.mark.parametrize("mode", ["global_lock", "v6_15"])
def test_check_39_r1_fixed(mode: str) -> None:
    report = scenario("R1", mode)
    assert report.failures == [] and report.complete


def test_check_40_r0_double_probe() -> None:
    report = scenario("R0", "pre_6_7+probe_unlocked")
    assert any("probe_device called 2 times" in f.message for f in report.failures)
    for mode in ("pre_6_7", "global_lock", "v6_15"):
        assert scenario("R0", mode).failures == []


def _r2_no_checks(mode: str) -> Callable[[], Instance]:
    def build() -> Instance:
        k = Kernel(mode, checks=frozenset())
        x, y = iommu("X"), iommu("Y")
        k.place(client("D", (x, 5)))
        results: dict[str, int] = {}

        def walk(name: str, handle: IommuHandle) -> Callable[[], None]:
            return lambda: results.__setitem__(name, register(k, handle))

        def check() -> None:
            if k.violations:
                raise InvariantViolation(f"recorded {k.violations}; results {results}")

        return Instance({"W1": walk("W1", x), "W2": walk("W2", y)}, check=check)

    return build


def test_check_41_r2_without_recheck() -> None:
    report = explore(_r2_no_checks("v6_15+relock_no_recheck"), preemption_bound=2,
                     failures_dir=None)
    messages = [f.message for f in report.failures]
    # the second probe_device for D, its iommu_device_link -EEXIST failing that walk ...
    assert any("probe_device called 2 times" in m and ": -17" in m for m in messages)
    # ... and the NULL deref when D, still grouped, is used through its freed dev_iommu
    assert any("NullDeref" in m and "dev_iommu_ops" in m for m in messages)
    for preset in ("pre_6_7", "global_lock"):
        assert scenario("R2", preset).failures == []


def test_check_42_r2_fixed() -> None:
    report = scenario("R2", "v6_15")
    assert report.failures == [] and report.complete


def test_check_43_w2_with_fwspec_never_drops_lock() -> None:
    k = Kernel()
    x = iommu("X")
    listed_only(k, x)
    dev = k.place(client("D", (x, 5)))

    def parsed() -> int:
        assert k.core.dev_iommu_get(dev) is not None
        return k.core.fwspec_init(dev, x.node) or k.core.fwspec_add_ids(dev, [5])

    assert locked(k, parsed) == 0
    drops: list[str] = []
    real_unlock = k.core._unlock

    def unlock() -> None:
        if k.core.initialising:
            drops.append("dropped inside init_device")
        real_unlock()

    k.core._unlock = unlock  # type: ignore[method-assign]
    assert locked(k, lambda: k.core.probe_device_locked(dev, None)) == 0
    assert drops == [] and device_state(dev) == "S5"


def test_check_44_r3_bind_before_default_domain() -> None:
    for mode in ("pre_6_7", "global_lock", "v6_15+no_default_domain_gate"):
        report = scenario("R3", mode)
        assert any("invariant 7" in f.message for f in report.failures), mode


def test_check_45_r3_fixed() -> None:
    report = scenario("R3", "v6_15")
    assert report.failures == [] and report.complete


def _r4_sequential(mode: str) -> tuple[Kernel, Device, int]:
    k = Kernel(mode, checks=frozenset())
    x = iommu("X")
    listed_only(k, x)  # step 1: X listed, its walk not at D yet
    dev = k.place(client("D", (x, 0x42)))
    first = k.drivers.really_probe(dev, Driver("client"))  # step 2
    assert k.core.bus_iommu_probe(k.buses["platform"]) == 0  # step 3: the walk reaches D
    x.inst.ready = True
    return k, dev, first


def test_check_46_r4_replay_ahead_of_walk() -> None:
    k, dev, first = _r4_sequential("v6_15+no_ready_flag")
    assert first == 0 and k.warned(LATE_PROBE_WARNING) == 1
    group = dev.iommu_group
    assert group is not None and group.setup_path == "immediate"
    assert group.setup_while_unready == ("X",)
    for preset in ("pre_6_7", "global_lock"):
        k, dev, first = _r4_sequential(preset)
        assert first == 0 and k.warned(LATE_PROBE_WARNING) == 0
        assert dev.iommu_group is not None and dev.iommu_group.setup_path == "immediate"


def test_check_47_r4_fixed() -> None:
    k, dev, first = _r4_sequential("v6_15")
    assert first == EPROBE_DEFER and k.warned(LATE_PROBE_WARNING) == 0
    assert dev.iommu_group is not None and dev.iommu_group.setup_path == "walk"
    assert k.drivers.really_probe(dev, Driver("client")) == 0
    assert scenario("R4", "v6_15").failures == []


def test_check_48_r5_stale_fwspec() -> None:
    assert hazards(scenario("R5", "v6_15+cache_fwspec_ptr")) == {"use-after-free"}
    assert scenario("R5", "v6_15").failures == []


@pytest.mark.parametrize(("mode", "leaks"), [("v6_15+leaky_of_xlate_driver", 3), ("v6_15", 0)])
def test_check_49_of_xlate_driver_data_leak(mode: str, leaks: int) -> None:
    k = Kernel(mode, checks=frozenset())
    sysmmu = SmmuDriver("sysmmu")  # two instances of one driver, as on Exynos
    x = ready_x(k, driver=sysmmu)
    y = iommu("Y", driver=sysmmu)
    dev = k.place(client("D", (x, 1), (y, 2)))
    drv = Driver("client")
    for attempt in range(1, 4):
        assert k.drivers.really_probe(dev, drv) == EPROBE_DEFER
        assert len(leaked_objects(k)) == min(attempt, leaks)
    assert register_and_trigger(k, y) == 0
    assert k.drivers.really_probe(dev, drv) == 0
    k.drivers.device_del(dev)
    assert len(leaked_objects(k)) == leaks


def test_check_50_cleanup_overreach() -> None:
    crash = scenario("overreach", "v6_15+cleanup_overreach+relock_no_recheck")
    assert hazards(crash) == {"null-deref"}
    assert scenario("overreach", "v6_15+cleanup_overreach").failures == []
    assert scenario("overreach", "v6_15").failures == []


def test_check_51_cleanup_underreach() -> None:
    bad = scenario("underreach", "v6_15+cleanup_underreach")
    assert any("invariant 6" in f.message for f in bad.failures)
    assert scenario("underreach", "v6_15").failures == []


def _fuzz_world() -> Instance:
    k = Kernel()
    x, y = iommu("X"), iommu("Y")
    clients = [k.place(client("C1", (x, 1))), k.place(client("C2", (y, 2)))]
    k.place(client("P"))
    hot = client("H", (x, 3))
    drv = Driver("c1")
    results: dict[str, int] = {}

    def run(name: str, fn: Callable[[], int]) -> Callable[[], None]:
        return lambda: results.__setitem__(name, fn())

    def check() -> None:
        check_quiescent(k)
        for dev in [*clients, hot]:
            assert device_state(dev) in ("S5", "S0"), f"{dev.name}: {device_state(dev)}"
        assert clients[0].bound and device_state(clients[0]) == "S5"
        assert device_state(k.device("P")) == "S0"
        assert results["WX"] == results["WY"] == results["C"] == 0, results

    return Instance(
        {"WX": run("WX", lambda: register_and_trigger(k, x)),
         "WY": run("WY", lambda: register_and_trigger(k, y)),
         "C": run("C", lambda: k.drivers.probe_until_bound(clients[0], drv)),
         "H": run("H", lambda: k.drivers.device_add(hot, k.buses["platform"]))},
        check=check,
    )


def test_check_52_random_fuzz() -> None:
    report = explore(_fuzz_world, strategy="random", seed=52, max_schedules=1000,
                     failures_dir=None)
    assert report.schedules_explored == 1000 and report.failures == []
    for mode, case in OWN_TOPOLOGY.items():
        found = run_scenario(SCENARIO, mode=mode, case=case, strategy="random",
                             seed=0, max_schedules=2000, failures_dir=None,
                             stop_on_failure=True)
        assert_hazard(found, *OWN_HAZARD[mode])


#: each faulty switch and the docs/models/iommu-probe.md §11.5 topology reproducing it
OWN_TOPOLOGY = {
    "pre_6_7+probe_unlocked": "R0",
    "v6_15+relock_no_recheck": "R2",
    "v6_15+no_default_domain_gate": "R3",
    "v6_15+no_ready_flag": "R4",
    "v6_15+cache_fwspec_ptr": "R5",
    "v6_15+leaky_of_xlate_driver": "leak",
    "v6_15+cleanup_overreach+relock_no_recheck": "overreach",
    "v6_15+cleanup_underreach": "underreach",
}
#: the hazard and message each switch's own topology must end in
OWN_HAZARD = {
    "pre_6_7+probe_unlocked": ("invariant-violation", "invariant 2: probe_device called 2"),
    "v6_15+relock_no_recheck": ("invariant-violation", "invariant 2: probe_device called 2"),
    "v6_15+no_default_domain_gate": ("invariant-violation", "invariant 7: D bound with direct"),
    "v6_15+no_ready_flag": ("invariant-violation", "invariant 8: off-path configure"),
    "v6_15+cache_fwspec_ptr": ("use-after-free", "fwspec#"),
    "v6_15+leaky_of_xlate_driver": ("memory-leak", "invariant 9"),
    "v6_15+cleanup_overreach+relock_no_recheck": ("null-deref", "D->iommu"),
    "v6_15+cleanup_underreach": ("invariant-violation", "invariant 6: configure of D failed"),
}
