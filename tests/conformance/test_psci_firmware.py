"""Conformance checks of docs/models/psci-firmware-registers.md §10, by number."""

from __future__ import annotations

import errno
import itertools
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

import pytest

from vmferry.analysis.matrix import CellSpec, run_cell
from vmferry.errors import DoubleFree, UseAfterFree
from vmferry.guest.psci_client import Arm64Guest, probe
from vmferry.hw.kvm import psci as P
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import (
    KVM_ARM_VCPU_EL1_32BIT,
    KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_PSCI_0_2,
    FwFaults,
    HostMitigation,
    KvmError,
    KvmVcpu,
    KvmVm,
    MpState,
    RegListTooSmall,
    SystemEventType,
    WaLevel,
    Workaround,
    host_reg_level,
)
from vmferry.machine.arm64 import (
    Arm64InitError,
    Arm64Machine,
    Arm64State,
    Arm64VcpuState,
    CpregList,
    CpuLoadError,
    Level,
    MergeMode,
    decode_cpregs,
    decode_state,
    encode_cpregs,
    encode_state,
    init_cpreg_list,
)
from vmferry.machine.profiles import HostProfile, load_profile
from vmferry.sched import ModelThread, Scheduler

K2, K3, K4, K5, K6, K7 = (
    "arm64-linux-4.17",
    "arm64-linux-5.3",
    "arm64-linux-5.17",
    "arm64-linux-5.19",
    "arm64-linux-6.13",
    "arm64-linux-6.15",
)
U, A, N = WaLevel.NOT_AVAIL, WaLevel.AVAIL, WaLevel.NOT_REQUIRED
PSCI = R.KVM_REG_ARM_PSCI_VERSION
WA1, WA2, WA3 = (
    R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1,
    R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2,
    R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3,
)
STD, STD_HYP, VENDOR, VENDOR2 = R.BITMAP_REGS


def profile(
    name: str, mitigation: HostMitigation | None = None, **overrides: object
) -> HostProfile:
    prof = load_profile(name, overrides or None)
    return prof.with_mitigation(mitigation) if mitigation else prof


def new_vm(
    name: str, mitigation: HostMitigation | None = None, faults: FwFaults | None = None
) -> KvmVm:
    caps, mit = profile(name, mitigation).arm64()
    return KvmVm(caps, mit, faults)


def new_vcpu(vm: KvmVm, features: set[int] | None = None) -> KvmVcpu:
    vcpu = vm.create_vcpu()
    vcpu.vcpu_init({KVM_ARM_VCPU_PSCI_0_2} if features is None else features)
    return vcpu


def errno_of(fn: object, *args: int) -> int:
    assert callable(fn)
    with pytest.raises(KvmError) as info:
        fn(*args)
    return info.value.errno


def set_ok(vcpu: KvmVcpu, rid: int, value: int) -> bool:
    try:
        vcpu.set_one_reg(rid, value)
    except KvmError:
        return False
    return True


# --- kernel model ---------------------------------------------------------------------------


def test_check_1_psci_version_encoding() -> None:
    assert P.PsciVersion.make(1, 3) == 0x10003
    assert P.PsciVersion.major(0x10003) == 1
    assert P.PsciVersion.minor(0x10003) == 3
    assert P.PsciVersion.make(0, 2) == 0x2


def test_check_2_register_id_builders() -> None:
    assert [R.fw_reg(r) for r in range(4)] == [0x6030000000140000 + r for r in range(4)]
    assert [R.fw_feat_bmap_reg(r) for r in range(4)] == [0x6030000000160000 + r for r in range(4)]
    assert all(R.reg_size(r) == 8 for r in R.FW_REG_ORDER)


def test_check_3_reg_list_order() -> None:
    vcpu = new_vcpu(new_vm(K5))
    with pytest.raises(RegListTooSmall) as info:
        vcpu.get_reg_list(0)
    assert info.value.errno == errno.E2BIG
    ids = vcpu.get_reg_list(info.value.n_required)
    assert len(ids) == info.value.n_required
    fw = [r for r in ids if R.is_firmware(r)]
    assert fw == [PSCI, WA1, WA2, WA3, STD, STD_HYP, VENDOR]
    first_fw, last_fw = ids.index(fw[0]), ids.index(fw[-1])
    assert all(R.coproc_of(r) == R.Coproc.CORE for r in ids[:first_fw])
    assert all(R.coproc_of(r) == R.Coproc.SYSREG for r in ids[last_fw + 1 :])
    k7 = new_vcpu(new_vm(K7))
    assert [r for r in k7.reg_list() if R.is_firmware(r)][-1] == VENDOR2


def test_check_4_enoexec_before_init() -> None:
    vcpu = new_vm(K5).create_vcpu()
    assert errno_of(vcpu.get_one_reg, PSCI) == errno.ENOEXEC
    assert errno_of(vcpu.set_one_reg, PSCI, 0x2) == errno.ENOEXEC
    assert errno_of(vcpu.get_reg_list, 1000) == errno.ENOEXEC


def test_check_5_bad_arch_word() -> None:
    vcpu = new_vcpu(new_vm(K5))
    assert errno_of(vcpu.get_one_reg, 0x4030000000140000) == errno.EINVAL
    assert errno_of(vcpu.set_one_reg, 0x4030000000140000, 0) == errno.EINVAL


def test_check_6_unknown_fw_errno_per_era() -> None:
    k2 = new_vcpu(new_vm(K2))
    assert errno_of(k2.get_one_reg, 0x6030000000140001) == errno.EINVAL
    assert errno_of(k2.set_one_reg, 0x6030000000140001, 0) == errno.EINVAL
    for name in (K3, K5, K7):
        assert errno_of(new_vcpu(new_vm(name)).set_one_reg, 0x6030000000140009, 0) == errno.ENOENT
    for name in (K5, K7):
        assert errno_of(new_vcpu(new_vm(name)).set_one_reg, 0x6030000000160007, 0) == errno.ENOENT


def test_check_7_default_version_per_era() -> None:
    assert new_vcpu(new_vm(K5)).get_one_reg(PSCI) == 0x10001
    assert new_vcpu(new_vm(K6)).get_one_reg(PSCI) == 0x10003
    assert new_vcpu(new_vm(K2)).get_one_reg(PSCI) == 0x10000


def test_check_8_no_psci_0_2_feature() -> None:
    vm = new_vm(K5)  # allows mixed feature sets
    v02, v01 = new_vcpu(vm), new_vcpu(vm, set())
    v02.set_one_reg(PSCI, 0x10000)
    assert v01.get_one_reg(PSCI) == 0x1
    vm6 = new_vm(K6)  # one feature set per VM
    new_vcpu(vm6)
    second = vm6.create_vcpu()
    assert errno_of(second.vcpu_init, set()) == errno.EINVAL
    assert not second.initialized


def test_check_9_set_on_psci_0_2_vcpu() -> None:
    vm = new_vm(K5)
    vcpus = [new_vcpu(vm) for _ in range(3)]
    assert errno_of(vcpus[0].set_one_reg, PSCI, 0x1) == errno.EINVAL
    assert vm.psci_version == 0
    vcpus[1].set_one_reg(PSCI, 0x2)
    assert [v.get_one_reg(PSCI) for v in vcpus] == [0x2, 0x2, 0x2]


def test_check_10_set_on_psci_0_1_vcpu() -> None:
    vcpu = new_vcpu(new_vm(K5), set())
    assert errno_of(vcpu.set_one_reg, PSCI, 0x2) == errno.EINVAL
    vcpu.set_one_reg(PSCI, 0x1)
    assert vcpu.get_one_reg(PSCI) == 0x1


def test_check_11_settable_versions() -> None:
    assert errno_of(new_vcpu(new_vm(K5)).set_one_reg, PSCI, 0x10003) == errno.EINVAL
    new_vcpu(new_vm(K6)).set_one_reg(PSCI, 0x10003)
    for name in (K2, K3, K4, K5, K6, K7):
        vcpu = new_vcpu(new_vm(name))
        for bad in (0x10004, 0x0, 0x20000):
            assert errno_of(vcpu.set_one_reg, PSCI, bad) == errno.EINVAL
        assert vcpu.vm.psci_version == 0


def test_check_12_set_version_after_run() -> None:
    vcpu = new_vcpu(new_vm(K5))
    vcpu.run()
    vcpu.set_one_reg(PSCI, 0x10000)
    assert vcpu.hvc(P.PSCI_ID["PSCI_VERSION"])[0] == 0x10000


def test_check_13_wa1_levels() -> None:
    vcpu = new_vcpu(new_vm(K4, HostMitigation(wa1=A)))
    assert vcpu.get_one_reg(WA1) == 1
    assert set_ok(vcpu, WA1, 0) and set_ok(vcpu, WA1, 1)
    for bad in (2, 0x10, 3):
        assert errno_of(vcpu.set_one_reg, WA1, bad) == errno.EINVAL


def test_check_14_wa_set_stores_nothing() -> None:
    vcpu = new_vcpu(new_vm(K4, HostMitigation(wa1=A)))
    vcpu.set_one_reg(WA1, 0)
    assert vcpu.get_one_reg(WA1) == 1
    faulty = new_vcpu(new_vm(K4, HostMitigation(wa1=A), FwFaults(store_wa_on_set=True)))
    faulty.set_one_reg(WA1, 0)
    assert faulty.get_one_reg(WA1) == 0  # the stale-state hazard, reproduced


def test_check_15_wa2_narrowing() -> None:
    vcpu = new_vcpu(new_vm(K4, HostMitigation(wa2=N)))
    assert vcpu.get_one_reg(WA2) == 3
    for ok in (0, 1, 2, 3, 0x12):
        assert set_ok(vcpu, WA2, ok), hex(ok)
    for bad in (0x11, 0x13, 4, 0x20):
        assert errno_of(vcpu.set_one_reg, WA2, bad) == errno.EINVAL


def test_check_16_wa2_ssbs_everywhere() -> None:
    vcpu = new_vcpu(new_vm(K4, HostMitigation(wa2=A, ssbs_everywhere=True)))
    assert vcpu.get_one_reg(WA2) == 0
    assert errno_of(vcpu.set_one_reg, WA2, 2) == errno.EINVAL
    vcpu.set_one_reg(WA2, 1)


def test_check_17_wa3() -> None:
    vcpu = new_vcpu(new_vm(K4, HostMitigation(wa3=N)))
    assert vcpu.get_one_reg(WA3) == 2
    vcpu.set_one_reg(WA3, 2)
    vuln = new_vcpu(new_vm(K4, HostMitigation(wa3=U)))
    assert errno_of(vuln.set_one_reg, WA3, 1) == errno.EINVAL


def test_check_18_bitmap_defaults() -> None:
    vcpu = new_vcpu(new_vm(K5))
    assert [vcpu.get_one_reg(r) for r in (STD, STD_HYP, VENDOR)] == [0x1, 0x1, 0x3]
    assert new_vcpu(new_vm(K7)).get_one_reg(VENDOR2) == 0x0


def test_check_19_bitmap_gates_services() -> None:
    vcpu = new_vcpu(new_vm(K5))
    assert errno_of(vcpu.set_one_reg, STD, 0x2) == errno.EINVAL
    assert vcpu.get_one_reg(STD) == 0x1
    vcpu.set_one_reg(VENDOR, 0x1)
    assert vcpu.hvc(P.KVM_VENDOR_HYP_PTP)[0] == -1
    assert vcpu.hvc(P.KVM_VENDOR_HYP_FEATURES)[0] == 0x1  # FEATURES works, PTP bit gone


def test_check_20_bitmap_after_run() -> None:
    vcpu = new_vcpu(new_vm(K5))
    vcpu.run()
    vcpu.set_one_reg(VENDOR, 0x3)
    assert errno_of(vcpu.set_one_reg, VENDOR, 0x1) == errno.EBUSY
    assert vcpu.get_one_reg(VENDOR) == 0x3


@pytest.mark.parametrize(("level", "expected"), [(A, 0), (N, 1), (U, -1)])
def test_check_21_smccc_answers(level: WaLevel, expected: int) -> None:
    vcpu = new_vcpu(new_vm(K4, HostMitigation(wa1=level)))
    assert vcpu.hvc(P.Smccc.VERSION)[0] == 0x10001
    assert vcpu.hvc(P.Smccc.ARCH_FEATURES, P.Smccc.ARCH_WORKAROUND_1)[0] == expected
    pinned = new_vcpu(new_vm(K4, HostMitigation(wa1=level)))
    pinned.set_one_reg(PSCI, 0x2)
    assert pinned.hvc(P.Smccc.VERSION)[0] == 0x10001
    assert new_vcpu(new_vm(K4), set()).hvc(P.Smccc.VERSION)[0] == 0x10001
    old = new_vcpu(new_vm(K3, HostMitigation(wa1=N)))
    assert old.hvc(P.Smccc.ARCH_FEATURES, P.Smccc.ARCH_WORKAROUND_1)[0] == -2


def test_check_22_psci_0_2_hides_smccc() -> None:
    vcpu = new_vcpu(new_vm(K4))
    vcpu.set_one_reg(PSCI, 0x2)
    assert vcpu.hvc(P.PSCI_ID["PSCI_FEATURES"], P.Smccc.VERSION)[0] == -1
    view = probe(vcpu)
    assert not view.smccc_1_1
    assert all(fid != P.Smccc.ARCH_FEATURES for fid, _ in view.calls)
    vcpu.set_one_reg(PSCI, 0x10000)
    assert vcpu.hvc(P.PSCI_ID["PSCI_FEATURES"], P.Smccc.VERSION)[0] == 0


def test_check_23_psci_features_gating() -> None:
    vcpu = new_vcpu(new_vm(K5))
    features = P.PSCI_ID["PSCI_FEATURES"]
    vcpu.set_one_reg(PSCI, 0x10000)
    assert vcpu.hvc(features, 0x84000012)[0] == -1
    vcpu.set_one_reg(PSCI, 0x10001)
    assert vcpu.hvc(features, 0x84000012)[0] == 0
    assert vcpu.hvc(features, 0x8400000E)[0] == -1
    vcpu.vm.enable_system_suspend()
    assert vcpu.hvc(features, 0x8400000E)[0] == 0


def test_check_24_32bit_vcpu() -> None:
    vcpu = new_vcpu(new_vm(K5), {KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VCPU_EL1_32BIT})
    assert vcpu.hvc(0xC4000003)[0] == -1
    assert vcpu.hvc(P.PSCI_ID["PSCI_FEATURES"], 0xC4000003)[0] == -1


def test_check_25_cpu_on() -> None:
    vm = new_vm(K5)
    caller, target = new_vcpu(vm), new_vcpu(vm)
    cpu_on = P.PSCI_ID64["CPU_ON"]
    assert caller.hvc(cpu_on, target.mpidr & 0xFF00FFFFFF)[0] == -4
    assert caller.hvc(cpu_on, 1 << 40)[0] == -2
    assert caller.hvc(cpu_on, 0x55)[0] == -2
    vm01 = new_vm(K5)
    c01, t01 = new_vcpu(vm01, set()), new_vcpu(vm01, set())
    assert c01.hvc(P.Psci01.CPU_ON, t01.mpidr & 0xFF00FFFFFF)[0] == -2


def test_check_26_affinity_info() -> None:
    vm = new_vm(K5)
    a = new_vcpu(vm)
    b = new_vcpu(vm, {KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VCPU_POWER_OFF})
    info = P.PSCI_ID64["AFFINITY_INFO"]
    assert a.hvc(info, 0, 4)[0] == -2
    assert a.hvc(info, b.mpidr & 0xFF00FFFFFF, 0)[0] == 1
    assert a.hvc(info, a.mpidr & 0xFF00FFFFFF, 0)[0] == 0
    assert a.hvc(info, 0, 1)[0] == 0  # level 1 matches both; one runs


def test_check_27_system_reset2() -> None:
    vm = new_vm(K5)
    vcpu = new_vcpu(vm)
    reset2 = P.PSCI_ID["SYSTEM_RESET2"]
    assert vcpu.hvc(reset2, 1)[0] == -2 and vcpu.pending_exit is None
    for kind in (0, 0x80000000):
        vcpu.pending_exit = None
        x0 = vcpu.hvc(reset2, kind)[0]
        assert vcpu.pending_exit is not None
        assert vcpu.pending_exit.type is SystemEventType.RESET
        assert vcpu.pending_exit.flags == 1 and x0 == -6


def test_check_28_system_off() -> None:
    vm = new_vm(K5)
    vcpus = [new_vcpu(vm) for _ in range(3)]
    assert vcpus[0].hvc(P.PSCI_ID["SYSTEM_OFF"])[0] == -6
    assert all(v.mp_state is MpState.STOPPED for v in vcpus)
    assert vcpus[0].pending_exit is not None
    assert vcpus[0].pending_exit.type == 1


def test_check_29_migrate_calls() -> None:
    for version in (0x2, 0x10000, 0x10001):
        vcpu = new_vcpu(new_vm(K5))
        vcpu.set_one_reg(PSCI, version)
        assert vcpu.hvc(P.PSCI_ID["MIGRATE_INFO_TYPE"])[0] == 2
        assert vcpu.hvc(P.PSCI_ID["MIGRATE"])[0] == -1


# --- QEMU model and migration ------------------------------------------------------------------


def test_check_30_cpreg_list_shape() -> None:
    cpregs = Arm64Machine(profile(K7)).cpregs[0]
    ids = list(cpregs.ids)
    assert ids == sorted(set(ids))
    assert all(R.coproc_of(r) not in (0x10, 0x15) for r in ids)
    sysregs = [n for n, r in enumerate(ids) if R.coproc_of(r) == R.Coproc.SYSREG]
    fw = [n for n, r in enumerate(ids) if R.is_firmware(r)]
    assert fw and max(sysregs) < min(fw)


def test_check_31_u128_outside_core_fails() -> None:
    caps, mit = profile(K5).arm64()
    bad = R.SysReg("BAD128", R.reg_id(R.Coproc.SYSREG, 0x1234, R.KVM_REG_SIZE_U128))
    vm = KvmVm(replace(caps, sysregs=(*caps.sysregs, bad)), mit)
    with pytest.raises(Arm64InitError):
        init_cpreg_list(new_vcpu(vm))


def test_check_32_cpreg_section_format() -> None:
    cpregs = CpregList((0x6030000000130001, PSCI), (7, 0x10001))
    data = encode_cpregs(cpregs)
    assert data[:4] == struct.pack(">i", 2)
    assert struct.unpack(">2Q", data[4:20]) == cpregs.ids
    assert struct.unpack(">2Q", data[20:36]) == cpregs.values
    assert decode_cpregs(data) == cpregs
    state = Arm64Machine(profile(K7)).save()
    assert decode_state(encode_state(state)) == state


def _state_with(cpregs: CpregList, like: Arm64State) -> Arm64State:
    vcpu = like.vcpus[0]
    return Arm64State((Arm64VcpuState(vcpu.index, vcpu.powered_off, vcpu.core, cpregs),))


def test_check_33_length_gate_before_any_set(monkeypatch: pytest.MonkeyPatch) -> None:
    dst = Arm64Machine(profile(K5))
    own = dst.cpregs[0]
    extra = CpregList((*own.ids, R.fw_reg(9)), (*own.values, 0))
    calls: list[int] = []
    original = KvmVcpu.set_one_reg
    monkeypatch.setattr(
        KvmVcpu,
        "set_one_reg",
        lambda self, rid, value: calls.append(rid) or original(self, rid, value),
    )
    with pytest.raises(CpuLoadError) as info:
        dst.load(_state_with(extra, dst.save()), MergeMode.CLASSIC)
    assert info.value.step == "cpreg_vmstate_array_len"
    assert calls == []


def test_check_34_classic_drops_trailing_unknown() -> None:
    src = Arm64Machine(profile(K5), psci_pin=0x10000)  # a version the 5.17 host accepts
    state = src.save()
    roomy = profile(K4, sysregs={"count": 120})  # more sysregs, no bitmap registers
    dst = Arm64Machine(roomy)
    assert len(state.vcpus[0].cpregs.ids) <= len(dst.cpregs[0].ids)
    report = dst.load(state, MergeMode.CLASSIC)
    assert [r for r, _ in report.dropped] == [STD, STD_HYP, VENDOR]
    strict = Arm64Machine(roomy)
    with pytest.raises(CpuLoadError) as info:
        strict.load(state, MergeMode.STRICT)
    assert info.value.step == "post_load merge" and info.value.rid == STD


@pytest.mark.parametrize("mode", list(MergeMode))
def test_check_35_unknown_sysreg_before_known(mode: MergeMode) -> None:
    dst = Arm64Machine(profile(K5))
    own = dst.cpregs[0]
    unknown = R.sys_reg(3, 0, 1, 0, 1)  # ACTLR_EL1: not exposed by this host
    tpidr = R.sys_reg(3, 0, 13, 0, 4)  # replaced, so the length gate passes
    pairs = sorted([*(p for p in own.items() if p[0] != tpidr), (unknown, 5)])
    state = _state_with(
        CpregList(tuple(r for r, _ in pairs), tuple(v for _, v in pairs)), dst.save()
    )
    with pytest.raises(CpuLoadError) as info:
        dst.load(state, mode)
    assert info.value.step == "post_load merge" and info.value.rid == unknown
    assert not dst.vm.has_ran_once


def test_check_36_missing_register_keeps_own_value() -> None:
    dst = Arm64Machine(profile(K5))
    own = dst.cpregs[0]
    tcr = R.sys_reg(3, 0, 2, 0, 2)
    keep = [(r, v) for r, v in own.items() if r != tcr]
    state = _state_with(CpregList(tuple(r for r, _ in keep), tuple(v for _, v in keep)), dst.save())
    report = dst.load(state, MergeMode.CLASSIC)
    assert tcr in report.missing
    assert dst.vcpus[0].get_one_reg(tcr) == own.get(tcr)


def test_check_37_tolerated_bmap_2() -> None:
    src = Arm64Machine(profile(K7))
    state = src.save()
    Arm64Machine(profile(K6)).load(state, MergeMode.STRICT)
    src1 = Arm64Machine(profile(K7))
    src1.vcpus[0].set_one_reg(VENDOR2, 0x1)
    with pytest.raises(CpuLoadError) as info:
        Arm64Machine(profile(K6)).load(src1.save(), MergeMode.STRICT)
    assert info.value.rid == VENDOR2 and info.value.step == "post_load merge"


@pytest.mark.parametrize(
    ("extra", "step"), [(11, "cpreg_vmstate_array_len"), (10, "post_load merge")]
)
def test_check_38_strict_length_limit(extra: int, step: str) -> None:
    dst = Arm64Machine(profile(K5))
    own = dst.cpregs[0]
    unknown = [(R.fw_reg(4 + n), 0) for n in range(extra)]
    pairs = sorted([*own.items(), *unknown])
    state = _state_with(
        CpregList(tuple(r for r, _ in pairs), tuple(v for _, v in pairs)), dst.save()
    )
    with pytest.raises(CpuLoadError) as info:
        dst.load(state, MergeMode.STRICT)
    assert info.value.step == step


def test_check_39_failed_set_and_faulty_continue() -> None:
    src = Arm64Machine(profile(K4, HostMitigation.uniform(A)))
    src.start()
    guest = Arm64Guest()
    guest.boot(src.port(0), src.protection())
    state = src.save()
    dst_profile = profile(K4, HostMitigation.uniform(U))
    dst = Arm64Machine(dst_profile)
    with pytest.raises(CpuLoadError) as info:
        dst.load(state, MergeMode.CLASSIC)
    assert info.value.step == "set_one_reg" and info.value.rid == WA1
    assert not dst.vm.has_ran_once and not dst.started
    faulty = Arm64Machine(dst_profile)
    report = faulty.load(state, MergeMode.CLASSIC, continue_after_failed_post_load=True)
    assert WA1 in [r for r, _ in report.failed]
    faulty.start()
    assert guest.report(faulty.protection())["lost"] == ["wa1", "wa2", "wa3"]


def test_check_40_runtime_put_and_bitmap_ebusy() -> None:
    machine = Arm64Machine(profile(K5))
    machine.start()
    machine.put_registers(Level.RUNTIME)  # unchanged bitmap after run: accepted
    n = machine.cpregs[0].ids.index(VENDOR)
    values = list(machine.cpregs[0].values)
    values[n] = 0x1
    machine.cpregs[0] = CpregList(machine.cpregs[0].ids, tuple(values))
    with pytest.raises(CpuLoadError) as info:
        machine.put_registers(Level.RUNTIME)
    assert info.value.errno == errno.EBUSY and info.value.rid == VENDOR
    assert machine.vcpus[0].get_one_reg(VENDOR) == 0x3


def _hop(state: Arm64State, name: str, level: WaLevel) -> Arm64Machine:
    dst = Arm64Machine(profile(name, HostMitigation.uniform(level)))
    dst.load(decode_state(encode_state(state)), MergeMode.CLASSIC)
    dst.start()
    return dst


def test_check_42_chains() -> None:
    boot = Arm64Machine(profile(K4, HostMitigation.uniform(A)))
    boot.start()
    on_n = _hop(boot.save(), K4, N)
    with pytest.raises(CpuLoadError) as info:
        _hop(on_n.save(), K4, A)
    assert info.value.step == "set_one_reg" and info.value.rid == WA1
    current = Arm64Machine(profile(K4, HostMitigation.uniform(A)))
    current.start()
    boot_level = host_reg_level(current.vm.caps, current.vm.host, Workaround.WA1)
    for level in (A, N, N):
        current = _hop(current.save(), K4, level)
        level_now = host_reg_level(current.vm.caps, current.vm.host, Workaround.WA1)
        assert level_now >= boot_level  # invariant 7


def test_check_43_psci_1_3_to_1_1_host() -> None:
    src = Arm64Machine(profile(K6))
    with pytest.raises(CpuLoadError) as info:
        Arm64Machine(profile(K5)).load(src.save(), MergeMode.CLASSIC)
    assert info.value.step == "set_one_reg" and info.value.rid == PSCI
    pinned = Arm64Machine(profile(K6), psci_pin=0x10001)
    dst = Arm64Machine(profile(K5))
    dst.load(pinned.save(), MergeMode.CLASSIC)
    assert dst.vcpus[0].get_one_reg(PSCI) == 0x10001


def test_check_44_destination_keeps_stream_version() -> None:
    src = Arm64Machine(profile(K5))
    src.start()
    dst = Arm64Machine(profile(K6))
    dst.load(src.save(), MergeMode.CLASSIC)
    dst.start()
    assert dst.vcpus[0].hvc(P.PSCI_ID["PSCI_VERSION"])[0] == 0x10001
    dst.vcpus[0].hvc(P.PSCI_ID["SYSTEM_RESET"])
    for vcpu in dst.vcpus:  # the VMM re-runs KVM_ARM_VCPU_INIT on reset
        vcpu.vcpu_init({KVM_ARM_VCPU_PSCI_0_2})
    assert dst.vcpus[0].hvc(P.PSCI_ID["PSCI_VERSION"])[0] == 0x10001


# --- concurrency ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [(0x2, 0x10000), (0x10000, 0x2)])
def test_check_46_concurrent_psci_set_is_vm_wide(order: tuple[int, int]) -> None:
    vm = new_vm(K5)
    vcpus = [new_vcpu(vm) for _ in range(4)]
    vcpus[0].set_one_reg(PSCI, order[0])
    vcpus[1].set_one_reg(PSCI, order[1])
    seen = {v.get_one_reg(PSCI) for v in vcpus}
    assert seen == {order[1]}
    faulty = new_vm(K5, faults=FwFaults(per_vcpu_psci=True))
    fv = [new_vcpu(faulty) for _ in range(2)]
    fv[0].set_one_reg(PSCI, order[0])
    fv[1].set_one_reg(PSCI, order[1])
    assert len({v.get_one_reg(PSCI) for v in fv}) == 2  # the inconsistency hazard


# --- check 41 lives in tests/conformance/test_psci_matrix_rows.py; a smoke cell here ----------


def test_check_41_smoke_seed_case_new_to_old_fails() -> None:
    cell = run_cell(CellSpec(K2, "arm64-linux-4.16", "default", "avail", "avail", "qemu"))
    assert cell is not None and cell.outcome == "fails_after_stop"


# --- interleavings on the scheduler core (greenlets on the sync.yield_point seam) -----------


class Turns:
    """A chooser: the next thread comes from ``schedule`` (names consumed as used), then
    round-robin over the runnable threads; a name that cannot run gives its turn to the
    round-robin pick."""

    def __init__(self, schedule: Sequence[str]) -> None:
        self.schedule = list(schedule)

    def choose(self, sched: Scheduler[Any], depth: int, enabled: list[str]) -> str | None:
        fallback = enabled[depth % len(enabled)]
        wanted = self.schedule.pop(0) if self.schedule else fallback
        return wanted if wanted in enabled else fallback


def interleave(threads: dict[str, Callable[[], object]], schedule: Sequence[str]
               ) -> dict[str, object]:
    """Run ``threads`` along ``schedule``; what each returned.  A thread's exception is
    re-raised."""
    core: Scheduler[ModelThread] = Scheduler(threads)
    try:
        core.run(Turns(schedule))
    finally:
        core.teardown()
    for thread in core.threads.values():
        if thread.error is not None:
            raise thread.error
    assert not core.stuck(), f"interleaving did not terminate: {core.stuck()}"
    return {name: thread.result for name, thread in core.threads.items()}


def _bitmap_race(faults: FwFaults, schedule: Sequence[str]) -> tuple[bool, int]:
    vm = new_vm(K5, faults=faults)
    setter, runner = new_vcpu(vm), new_vcpu(vm)

    def do_set() -> bool:
        return set_ok(setter, VENDOR, 0x1)

    def do_run() -> int:
        runner.run()
        return runner.hvc(P.KVM_VENDOR_HYP_PTP)[0]  # 0: PTP still offered (old bitmap)

    out = interleave({"set": do_set, "run": do_run}, schedule)
    return bool(out["set"]), int(cast(int, out["run"]))


def test_check_48_bitmap_set_racing_first_run() -> None:
    schedules = [list(s) for s in itertools.product(("set", "run"), repeat=6)]
    bad = []
    for schedule in schedules:
        ok, ptp = _bitmap_race(FwFaults(), schedule)
        assert (ok and ptp == -1) or (not ok and ptp == 0), schedule
        ok, ptp = _bitmap_race(FwFaults(no_config_lock=True), schedule)
        if ok and ptp == 0:
            bad.append(schedule)
    assert bad  # the faulty mode lets a SET succeed under a guest that saw the old bitmap


def _cpu_on_race(faults: FwFaults, schedule: Sequence[str], n: int = 8) -> list[int]:
    vm = new_vm(K5, faults=faults)
    callers = [new_vcpu(vm) for _ in range(n)]
    target = new_vcpu(vm, {KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VCPU_POWER_OFF})
    mpidr = target.mpidr & 0xFF00FFFFFF
    threads = {
        f"t{i}": (lambda c=c: c.hvc(P.PSCI_ID64["CPU_ON"], mpidr)[0]) for i, c in enumerate(callers)
    }
    out = interleave(cast(dict[str, Callable[[], object]], threads), schedule)
    return sorted(int(cast(int, v)) for v in out.values())


def test_check_49_cpu_on_exactly_one_success() -> None:
    rng = random.Random(49)
    names = [f"t{i}" for i in range(8)]
    schedules = [["t0", "t1", "t0", "t1"]] + [
        [rng.choice(names) for _ in range(40)] for _ in range(150)
    ]
    for schedule in schedules:
        assert _cpu_on_race(FwFaults(), schedule) == [-4] * 7 + [0]
    faulty = [_cpu_on_race(FwFaults(cpu_on_unlocked=True), s) for s in schedules]
    assert any(r.count(0) >= 2 for r in faulty)


def test_check_47_version_read_once_per_call() -> None:
    rng = random.Random(47)
    schedules = [list(s) for s in itertools.product(("call", "set"), repeat=4)]
    schedules += [[rng.choice(("call", "set")) for _ in range(6)] for _ in range(1000)]

    def run(faults: FwFaults, schedule: Sequence[str]) -> tuple[int, int]:
        vm = new_vm(K5, faults=faults)
        caller, setter = new_vcpu(vm), new_vcpu(vm)
        caller.set_one_reg(PSCI, 0x10000)
        out = interleave(
            {
                "call": lambda: caller.hvc(P.PSCI_ID["PSCI_VERSION"])[0],
                "set": lambda: setter.set_one_reg(PSCI, 0x2),
            },
            schedule,
        )
        return caller.last_dispatch, int(cast(int, out["call"]))

    for schedule in schedules:
        dispatched, answered = run(FwFaults(), schedule)
        assert dispatched == answered, schedule
    mismatches = [
        s for s in schedules[:16] if len(set(run(FwFaults(double_read_version=True), s))) == 2
    ]
    assert mismatches  # 1.x handler chosen, 0.2 answered


def test_check_50_vcpu_held_across_destroy() -> None:
    vm = new_vm(K5)
    held = new_vcpu(vm).get()  # the migration thread's reference
    vm.destroy()
    assert errno_of(held.get_one_reg, PSCI) == errno.EBADF
    assert errno_of(held.hvc, P.PSCI_ID["PSCI_VERSION"]) == errno.EBADF
    assert held.refcount == 1 and not held.freed
    held.put()
    assert held.refcount == 0 and held.freed
    with pytest.raises(DoubleFree):
        held.put()
    faulty = new_vm(K5, faults=FwFaults(use_after_destroy=True))
    stale = new_vcpu(faulty).get()
    faulty.destroy()
    with pytest.raises(UseAfterFree):
        stale.get_one_reg(PSCI)


def test_check_45_save_during_a_power_transition_fails() -> None:
    from vmferry.machine.arm64 import Arm64Machine, PowerState, PowerTransitionError

    machine = Arm64Machine(load_profile("arm64-linux-6.15"), 2)
    before = machine.save()
    machine.begin_power_on(1)
    assert machine.power_state(1) is PowerState.ON_PENDING
    with pytest.raises(PowerTransitionError, match="vCPU 1 is between power states"):
        machine.save()
    machine.settle_power_on(1)
    assert machine.power_state(1) is PowerState.ON
    assert machine.save().vcpus[0] == before.vcpus[0]


@pytest.mark.parametrize("compat", ["preflight", "qemu"])
def test_check_45_the_migration_fails_and_the_source_resumes(compat: str) -> None:
    from vmferry.clock import ManualClock
    from vmferry.errors import MigrationError, MigrationRefused
    from vmferry.machine import HostContext, create_vm
    from vmferry.migration.destination import DestinationSession
    from vmferry.migration.local import transfer
    from vmferry.migration.source import MigrationParams, SourceSession

    host = HostContext("h", load_profile("arm64-linux-6.15"))
    definition = {"name": "a", "arch": "arm64", "memory_mib": 2, "vcpus": 2}
    vm = create_vm(definition, host)
    vm.start()
    machine = vm.handlers["arm64"].component.machine  # type: ignore[attr-defined]
    machine.begin_power_on(1)
    clock = ManualClock()
    src = SourceSession(vm, MigrationParams(compat=compat), clock)
    dst_vm = create_vm(definition, host)
    if compat == "preflight":  # pre-flight sees it: refused before anything moves
        with pytest.raises(MigrationRefused, match="between power states"):
            src.preflight(dst_vm.capabilities())
        assert vm.running and not vm.ram.logging
        return
    src.preflight(dst_vm.capabilities())
    dst = DestinationSession(clock, factory=lambda d: create_vm(d, host))
    with pytest.raises(MigrationError, match="between power states") as info:
        transfer(src, dst, clock)  # QEMU: put_power fails the save at switchover
    dst.abort()
    stats = src.fail(info.value.step, str(info.value))
    assert stats.error_step == "switchover (vCPU state)" and vm.running
