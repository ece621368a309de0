"""Issue 16 item 1: places where the models followed no kernel, now the kernel's behaviour.

Each test states the kernel's value and names the kernel function it comes from.
"""

from __future__ import annotations

import errno

import pytest
from spapr_tce_helpers import LIOBN, make, snapshot

from vmferry.guest.psci_client import Arm64Guest, Decision
from vmferry.hw.kvm import psci as P
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import (
    KVM_ARM_VCPU_PSCI_0_2,
    HostMitigation,
    KvmVcpu,
    KvmVm,
    Protection,
    WaLevel,
    Workaround,
    guest_protection,
)
from vmferry.hw.spapr.hcall import H_PUT_TCE, H_SUCCESS, H_TOO_HARD
from vmferry.hw.spapr.hostmem import DEFAULT_HPA_BASE
from vmferry.hw.spapr.tce import TCE_PCI_READ, TCE_PCI_WRITE
from vmferry.hw.vfio.states import VFIO_DEVICE_FEATURE, VFIO_DEVICE_FEATURE_GET
from vmferry.machine.arm64 import Arm64Machine
from vmferry.machine.profiles import load_profile
from vmferry.testing.vfio import expect_errno, feature_buf
from vmferry.testing.vfio import make as make_vfio

WA2 = R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2
U, A, N = WaLevel.NOT_AVAIL, WaLevel.AVAIL, WaLevel.NOT_REQUIRED
RW = TCE_PCI_READ | TCE_PCI_WRITE


def vcpu_on(profile: str, wa2: WaLevel) -> KvmVcpu:
    caps, _ = load_profile(profile).arm64()
    vm = KvmVm(caps, HostMitigation(wa2=wa2))
    vcpu = vm.create_vcpu()
    vcpu.vcpu_init({KVM_ARM_VCPU_PSCI_0_2})
    return vcpu


# --- arm64, 5.3-5.9: the per-vCPU WA_2 flag ----------------------------------------------


def test_issue16_item1_wa2_set_level_0_or_1_keeps_the_vcpu_flag() -> None:
    """kvm_arm_set_fw_reg (virt/kvm/arm/psci.c, 5.3-5.9) on a host that mitigates
    dynamically (KVM_SSBD_KERNEL): the final ``switch (wa_level)`` has cases only for AVAIL
    (flag := ENABLED bit) and NOT_REQUIRED (flag := on).  SET 0 or 1 leaves the flag as it
    was, so GET (kvm_arm_get_fw_reg: AVAIL | ENABLED while the flag is on) still reads 0x12."""
    vcpu = vcpu_on("arm64-linux-5.3", A)
    assert vcpu.get_one_reg(WA2) == 0x12  # flag on from reset
    for level in (0, 1):
        vcpu.set_one_reg(WA2, level)
        assert vcpu.get_one_reg(WA2) == 0x12, level  # kernel: 0x12, not 0x2
    vcpu.set_one_reg(WA2, 0x2)  # AVAIL without ENABLED: the flag goes off
    assert vcpu.get_one_reg(WA2) == 0x2
    for level in (0, 1):
        vcpu.set_one_reg(WA2, level)
        assert vcpu.get_one_reg(WA2) == 0x2, level  # ... and stays off
    vcpu.set_one_reg(WA2, 0x12)
    assert vcpu.get_one_reg(WA2) == 0x12


@pytest.mark.parametrize(("host", "flag", "get"), [(A, True, 0x12), (N, False, 3), (U, False, 0)])
def test_issue16_item1_wa2_flag_at_reset_only_on_a_dynamic_host(
    host: WaLevel, flag: bool, get: int
) -> None:
    """kvm_reset_vcpu (arch/arm64/kvm/reset.c, 5.3-5.9) sets VCPU_WORKAROUND_2_FLAG only
    when ``kvm_arm_have_ssbd() == KVM_SSBD_KERNEL`` (register level AVAIL); a mitigated
    (NOT_REQUIRED) or unmitigated host leaves it clear."""
    vcpu = vcpu_on("arm64-linux-5.3", host)
    assert vcpu.wa2_flag is flag
    assert vcpu.get_one_reg(WA2) == get


# --- arm64: the 4.17 / 4.18 era split -----------------------------------------------------


@pytest.mark.parametrize(
    ("host", "answer"),
    [(A, P.SmcccRet.SUCCESS), (N, P.SmcccRet.NOT_REQUIRED), (U, P.SmcccRet.NOT_SUPPORTED)],
)
def test_issue16_item1_wa2_discoverable_from_4_18(host: WaLevel, answer: int) -> None:
    """kvm_hvc_call_handler (virt/kvm/arm/psci.c) answers SMCCC_ARCH_FEATURES for
    ARCH_WORKAROUND_2 from 4.18 on (commits 5d81f7dc9bca, 55e3748e8902): KVM_SSBD_KERNEL ->
    SUCCESS (0), FORCE_ENABLE/MITIGATED -> NOT_REQUIRED (-2), otherwise NOT_SUPPORTED (-1).
    On 4.17 it is NOT_SUPPORTED whatever the host does."""
    wa2 = Workaround.WA2.fid
    old = vcpu_on("arm64-linux-4.17", host)
    assert old.hvc(P.Smccc.ARCH_FEATURES, wa2)[0] == P.SmcccRet.NOT_SUPPORTED
    new = vcpu_on("arm64-linux-4.18", host)
    assert new.hvc(P.Smccc.ARCH_FEATURES, wa2)[0] == answer


def test_issue16_item1_4_18_guest_mitigates_wa2_with_calls() -> None:
    """A guest booted on a 4.18-5.2 dynamically mitigating host discovers WA_2 and issues
    ARCH_WORKAROUND_2 calls (the host services them); on 4.17 it never learns of WA_2."""
    for profile, decision, truth in (
        ("arm64-linux-4.17", Decision.NONE, Protection.NONE),
        ("arm64-linux-4.18", Decision.FIRMWARE_CALLS, Protection.CALLS),
    ):
        machine = Arm64Machine(load_profile(profile))
        view = Arm64Guest().boot(machine.port(), machine.protection())
        assert view.decision(Workaround.WA2) is decision, profile
        caps, host = machine.profile.arm64()
        assert guest_protection(caps, host, Workaround.WA2) is truth, profile


def test_issue16_item1_profile_eras_stop_where_the_behaviour_changes() -> None:
    k2, k21 = load_profile("arm64-linux-4.17"), load_profile("arm64-linux-4.18")
    assert (k2.kernel, k21.kernel) == ("4.17", "4.18")
    assert "5.2" not in k2.description and "4.18-5.2" in k21.description
    assert k2.arm64()[0].fw_regs == k21.arm64()[0].fw_regs == (R.KVM_REG_ARM_PSCI_VERSION,)


# --- sPAPR TCE: validation as lenient as the kernel ----------------------------------------


def _big_pages() -> object:
    """16 MiB guest TCE pages over 64 KiB IOMMU pages; RAM in two 8 MiB memslots, so the
    first TCE page spans both slots (and both preregistered regions)."""
    return make(page_shift=24, hw_page_shift=16, ram=16 << 20, slot_sizes=[8 << 20, 8 << 20])


def test_issue16_item1_tce_validate_looks_at_one_iommu_page_and_the_first_host_page() -> None:
    """kvmppc_tce_validate (arch/powerpc/kvm/book3s_64_vio.c): kvmppc_tce_to_ua only needs
    the gfn of the TCE's first host page in a memslot; then, per attached hardware table,
    mm_iommu_lookup(ua, 1 << it_page_shift) -- one IOMMU page.  A 16 MiB TCE whose page
    runs over the end of its memslot is valid (H_SUCCESS), and H_PUT_TCE maps all 256
    subpages through both regions."""
    io = _big_pages()
    stt = io.kvm_tables.find(LIOBN)
    assert stt is not None
    assert io.kvm.validate(stt, 0 | RW) == H_SUCCESS
    assert io.kernel_hcall(H_PUT_TCE, LIOBN, 0, 0 | RW).ret == H_SUCCESS
    table = io.hw_tables(LIOBN)[0]
    assert [table.read(i) for i in (0, 127, 128, 255)] == [
        (DEFAULT_HPA_BASE + (i << 16)) | RW for i in (0, 127, 128, 255)]
    io.check_invariants()


def test_issue16_item1_tce_later_subpages_fail_at_map_not_at_validate() -> None:
    """With the second region unregistered, kvmppc_tce_validate still answers H_SUCCESS
    (it looks at the first IOMMU page only); kvmppc_tce_iommu_map then fails at subpage 128
    (mm_iommu_lookup in kvmppc_tce_iommu_do_map) with H_TOO_HARD, and the entry is cleared."""
    io = _big_pages()
    second = io.host.slots[1]
    io.container.unregister_memory(second.ua, second.size)
    stt = io.kvm_tables.find(LIOBN)
    assert stt is not None
    assert io.kvm.validate(stt, 0 | RW) == H_SUCCESS
    before = snapshot(io)
    assert io.kernel_hcall(H_PUT_TCE, LIOBN, 0, 0 | RW).ret == H_TOO_HARD
    assert snapshot(io) == before  # rolled back whole (the stricter variant's accounting)


# --- VFIO: an unknown device feature -------------------------------------------------------


@pytest.mark.parametrize("driver", ["mlx5", "pds", "hisi_acc"])
@pytest.mark.parametrize("index", [0x7FF, 0x400, 0xFFFF])
def test_issue16_item1_unknown_device_feature_is_enotty(driver: str, index: int) -> None:
    """vfio_ioctl_device_feature (drivers/vfio/vfio_main.c) passes an index it does not own
    to the driver's device_feature hook; the mlx5, pds and hisi_acc variant drivers use
    vfio_pci_core_ioctl_feature (drivers/vfio/pci/vfio_pci_core.c), whose default case
    returns -ENOTTY (not -EINVAL)."""
    dev = make_vfio(driver)
    state = dev.state
    expect_errno(errno.ENOTTY, dev.ioctl, VFIO_DEVICE_FEATURE,
                 feature_buf(VFIO_DEVICE_FEATURE_GET | index, bytes(8)))
    assert dev.state == state
