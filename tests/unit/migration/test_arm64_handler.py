"""arch = "arm64": VM construction on a host profile and the handler inside the engine."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.migration.test_engine import Link
from vmferry.errors import ConfigError, MalformedRecord, MigrationRefused
from vmferry.hw.kvm import regs as R
from vmferry.machine import VM, create_vm
from vmferry.machine.arm64 import CpuLoadError, MergeMode
from vmferry.machine.arm64_handler import Arm64Handler, Arm64Refused, arm64_handler
from vmferry.machine.handlers import ComponentData
from vmferry.machine.profiles import load_profile, parse_mitigation
from vmferry.machine.vm import HostContext
from vmferry.migration.context import Status
from vmferry.migration.source import MigrationParams

OLD, NEW, K5 = "arm64-linux-4.16", "arm64-linux-4.17", "arm64-linux-5.19"


def host(profile: str, mitigation: str = "avail", **overrides: Any) -> HostContext:
    p = load_profile(profile, overrides or None).with_mitigation(parse_mitigation(mitigation))
    return HostContext(profile, p)


def arm64_vm(on: HostContext, psci: str = "default", start: bool = True) -> VM:
    vm = create_vm({"name": "g", "arch": "arm64", "memory_mib": 2, "vcpus": 2,
                    "fill": "random", "psci": psci}, on)
    if start:
        vm.start()
    return vm


def link_to(vm: VM, dst: HostContext, **params: Any) -> Link:
    link = Link(vm, MigrationParams(**params))
    link.dst.factory = lambda d: create_vm(d, dst)
    caps = arm64_vm(dst, start=False)
    try:
        link.src.preflight(caps.capabilities())
    finally:
        caps.close()
    return link


def run_to_end(link: Link) -> None:
    link.push(link.src.start())
    while bufs := link.src.next_buffers():
        link.push(bufs)


def test_a_host_without_an_arm64_profile_refuses_the_vm() -> None:
    with pytest.raises(ConfigError, match="no arm64 profile"):
        create_vm({"name": "g", "arch": "arm64", "memory_mib": 1})
    with pytest.raises(ConfigError, match="psci"):
        create_vm({"name": "g", "arch": "arm64", "memory_mib": 1, "psci": "0.3"}, host(K5))
    generic = create_vm({"name": "g", "memory_mib": 1}, host(K5))  # generic VMs still fine
    assert generic.handlers == {}
    generic.close()


def test_the_guest_probes_once_when_started_and_pins_there() -> None:
    vm = arm64_vm(host(K5), psci="0.2", start=False)
    handler = arm64_handler(vm)
    assert vm.report()["arm64"]["guest"] == {"booted": False}
    vm.start()
    report = vm.report()["arm64"]
    assert report["guest"]["psci_version"] == "0.2" and not report["guest"]["smccc_1_1"]
    assert report["firmware"]["firmware_registers"]["PSCI_VERSION"] == "0x2"
    view = handler.component.guest.view
    vm.pause()
    vm.start()  # a resume is not a boot
    assert handler.component.guest.view is view
    vm.close()


def test_a_pin_the_kernel_refuses_keeps_the_vcpus_stopped() -> None:
    vm = arm64_vm(host(OLD), psci="0.2", start=False)
    with pytest.raises(ConfigError, match="cannot pin"):
        vm.start()
    assert not vm.running and arm64_handler(vm).component.guest.view is None
    vm.close()


def test_migration_keeps_the_boot_view_and_ignores_the_pin_on_arrival() -> None:
    vm = arm64_vm(host(NEW), psci="0.2")
    calls = arm64_handler(vm).component.guest.view.calls  # type: ignore[union-attr]
    link = link_to(vm, host(K5))
    run_to_end(link)
    ack = link.dst.finish()
    link.src.complete(ack)
    dst_vm = link.dst.vm
    assert dst_vm is not None and dst_vm.running
    dst = arm64_handler(dst_vm)
    assert dst.component.guest.view is not None and dst.component.guest.view.calls == calls
    assert ack["post_load"]["arm64"]["firmware"]["psci_version"] == "0.2"
    assert ack["digests"]["handler:arm64"] == link.src.switchover_digests()["handler:arm64"]
    dst_vm.close()


def test_preflight_refuses_with_register_and_value_before_anything_moves() -> None:
    vm = arm64_vm(host(NEW))
    with pytest.raises(Arm64Refused) as info:
        link_to(vm, host(OLD))
    assert info.value.register == R.KVM_REG_ARM_PSCI_VERSION and info.value.value == 0x10000
    assert info.value.step == "pre-flight" and "PSCI_VERSION = 0x10000" in str(info.value)
    assert vm.running and not vm.ram.logging
    vm.close()


def test_preflight_without_or_with_bad_destination_caps_refuses() -> None:
    vm = arm64_vm(host(K5))
    handler = arm64_handler(vm)
    with pytest.raises(MigrationRefused, match="did not describe"):
        handler.preflight(None, {"compat": "preflight"})
    with pytest.raises(MigrationRefused, match="malformed destination"):
        handler.preflight({"profile": "x"}, {"compat": "preflight"})
    with pytest.raises(ConfigError, match="compat"):
        handler.preflight({}, {"compat": "libvirt"})
    assert handler.preflight(None, {"compat": "qemu"}) == []  # QEMU has no pre-flight
    vm.close()


def test_degraded_needs_allow_and_warns() -> None:
    vm = arm64_vm(host(OLD))
    with pytest.raises(Arm64Refused, match="allow-degraded"):
        link_to(vm, host("arm64-linux-5.3", mitigation="not_avail"))
    link = link_to(vm, host("arm64-linux-5.3", mitigation="not_avail"), allow_degraded=True)
    assert link.src.stats.warnings[0].startswith("arm64: degraded migration allowed")
    run_to_end(link)
    ack = link.dst.finish()
    assert ack["post_load"]["arm64"]["guest"]["lost"] == ["wa1"]
    assert link.dst.vm is not None
    link.dst.vm.close()
    vm.close()


def test_qemu_mode_silently_drops_a_trailing_unknown_register() -> None:
    """Spec 5.3: the destination knows no PSCI_VERSION but lists more system registers,
    so the stream passes the length gate and the register sorting last is ignored."""
    bigger = host(OLD, sysregs={"count": 70})
    vm = arm64_vm(host(NEW))
    with pytest.raises(Arm64Refused, match="PSCI_VERSION"):
        link_to(vm, bigger)  # pre-flight runs the destination's strict merge
    link = link_to(vm, bigger, compat="qemu")
    run_to_end(link)
    ack = link.dst.finish()
    load = ack["post_load"]["arm64"]["load"]
    assert load["merge"] == "classic" and load["dropped"] == {"PSCI_VERSION": "0x10000"}
    assert link.dst.vm is not None
    link.dst.vm.close()
    vm.close()


def test_source_resumes_with_its_registers_after_a_failed_load() -> None:
    vm = arm64_vm(host(NEW))
    before = vm.report()
    link = link_to(vm, host(OLD), compat="qemu")
    run_to_end(link)
    assert not vm.running
    with pytest.raises(CpuLoadError):
        link.dst.finish()
    link.dst.abort()
    stats = link.src.fail("load", "destination refused the cpu state")
    assert stats.status is Status.FAILED and vm.running and vm.report() == before
    vm.close()


def test_malformed_state_is_refused_and_discarded() -> None:
    handler = Arm64Handler(load_profile(K5))
    with pytest.raises(MalformedRecord, match="no state"):
        handler.load_complete()
    handler.load(ComponentData("arm64", b"A64X\x01"))
    with pytest.raises(MalformedRecord, match="bad state envelope"):
        handler.load_complete()
    with pytest.raises(MalformedRecord, match="repeated"):
        handler.load(ComponentData("arm64", b""))
    handler.load_failed()
    assert handler.component.machine.vm.destroyed
    assert handler.merge is MergeMode.STRICT
