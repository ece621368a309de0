"""The guest's boot-time probe follows Linux's order and is never repeated."""

from __future__ import annotations

from vmferry.guest.psci_client import Arm64Guest, Decision, Status, probe
from vmferry.hw.kvm import psci as P
from vmferry.hw.kvm.arm64_fw import (
    KVM_ARM_VCPU_PSCI_0_2,
    KvmVcpu,
    KvmVm,
    Workaround,
    vm_protection,
)
from vmferry.machine.profiles import load_profile


def vcpu(name: str, mitigation: str = "avail") -> KvmVcpu:
    caps, mit = load_profile(name, {"mitigation": mitigation}).arm64()
    v = KvmVm(caps, mit).create_vcpu()
    v.vcpu_init({KVM_ARM_VCPU_PSCI_0_2})
    return v


def test_probe_order_on_a_1_x_host() -> None:
    view = probe(vcpu("arm64-linux-5.17"))
    assert [fid for fid, _ in view.calls] == [
        P.PSCI_ID["PSCI_VERSION"], P.PSCI_ID["PSCI_FEATURES"], P.Smccc.VERSION,
        P.Smccc.ARCH_FEATURES, P.Smccc.ARCH_FEATURES, P.Smccc.ARCH_FEATURES]
    assert view.decision(Workaround.WA1) is Decision.FIRMWARE_CALLS
    assert view.decision(Workaround.WA2) is Decision.NOT_NEEDED  # permanent host mitigation


def test_pre_spectre_host_offers_nothing() -> None:
    view = probe(vcpu("arm64-linux-4.15"))
    assert view.psci_version == 0x2 and not view.smccc_1_1
    assert len(view.calls) == 1


def test_no_reprobe_after_migration() -> None:
    source = vcpu("arm64-linux-4.16")
    guest = Arm64Guest()
    guest.boot(source, vm_protection(source.vm))
    calls = guest.view.calls if guest.view else ()
    dest = vcpu("arm64-linux-4.16", "not_avail")
    after = guest.status_on(vm_protection(dest.vm))
    assert after[Workaround.WA1] is Status.VULNERABLE
    assert guest.view is not None and guest.view.calls == calls
    assert guest.report(vm_protection(dest.vm))["lost"] == ["wa1"]
