"""Conformance check 41: every row of docs/models/psci-firmware-registers.md §6 (6.2 rows 1-14,
6.3, 6.4, 6.5).

Each case runs a migration cell on the models (``run_cell``: boot, probe, save, encode,
decode, load, start) in QEMU mode, and again with pre-flight to show the same case is then
caught before the source stops.
"""

from __future__ import annotations

import errno

import pytest

from vmferry.analysis.matrix import Cell, CellSpec, MatrixContext, run_cell
from vmferry.guest.psci_client import Arm64Guest, Decision, Status
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import Workaround
from vmferry.machine.arm64 import (
    Arm64InitError,
    Arm64Machine,
    Arm64State,
    Arm64VcpuState,
    CpregList,
    CpuLoadError,
    MergeMode,
)
from vmferry.machine.profiles import load_profile, parse_mitigation

K0, K1, K2, K3, K4, K5, K6, K7 = (
    "arm64-linux-4.15",
    "arm64-linux-4.16",
    "arm64-linux-4.17",
    "arm64-linux-5.3",
    "arm64-linux-5.17",
    "arm64-linux-5.19",
    "arm64-linux-6.13",
    "arm64-linux-6.15",
)
NEW = (K2, K3, K4, K5, K6, K7)
K3PLUS = (K3, K4, K5, K6, K7)
U, A, N = "not_avail", "avail", "not_required"
CTX = MatrixContext()


def cell(
    src: str,
    dst: str,
    psci: str = "default",
    sm: str = A,
    dm: str = A,
    compat: str = "qemu",
    allow: bool = False,
) -> Cell:
    result = run_cell(CellSpec(src, dst, psci, sm, dm, compat, allow), CTX)
    assert result is not None
    return result


def preflight_never_fails_after_stop(src: str, dst: str, psci: str, sm: str, dm: str) -> Cell:
    result = cell(src, dst, psci, sm, dm, "preflight")
    assert result.outcome in ("migrates", "refused")
    return result


# --- 6.2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sm", "dm"), [(A, A), (N, N), (U, A), (U, N), (A, N), (U, U)])
def test_row_1_old_to_old_same_or_better(sm: str, dm: str) -> None:
    assert cell(K1, K1, sm=sm, dm=dm).outcome == "migrates"
    assert preflight_never_fails_after_stop(K1, K1, "default", sm, dm).outcome == "migrates"


def test_row_2_old_to_old_less_mitigated_is_silent_loss() -> None:
    c = cell(K1, K1, sm=A, dm=U)
    assert c.outcome == "degraded" and c.lost == ("wa1",)
    pre = cell(K1, K1, sm=A, dm=U, compat="preflight")
    assert pre.outcome == "refused" and "Spectre-v2" in pre.reason
    assert cell(K1, K1, sm=A, dm=U, compat="preflight", allow=True).outcome == "degraded"


@pytest.mark.parametrize("dm", [U, A])
def test_row_3_old_to_pre_spectre_loss_and_downgrade(dm: str) -> None:
    c = cell(K1, K0, sm=A, dm=dm)
    assert c.outcome == "degraded" and "wa1" in c.lost
    assert (c.psci_before, c.psci_after) == ("1.0", "0.2")
    assert "downgraded 1.0 -> 0.2" in c.reason
    assert cell(K1, K0, sm=A, dm=dm, compat="preflight").outcome == "refused"


@pytest.mark.parametrize("dst", NEW)
def test_row_4_old_to_new_upgrades_silently(dst: str) -> None:
    c = cell(K1, dst)
    assert c.outcome == "migrates"
    latest = load_profile(dst).arm64()[0].psci_latest
    assert c.psci_after == f"{latest >> 16}.{latest & 0xFFFF}"
    if latest > 0x10000:
        assert "upgraded 1.0 ->" in c.reason
    assert preflight_never_fails_after_stop(K1, dst, "default", A, A).outcome == "migrates"


@pytest.mark.parametrize("dst", K3PLUS)
def test_row_5_old_to_k3_less_mitigated_is_silent_loss(dst: str) -> None:
    c = cell(K1, dst, sm=A, dm=U)
    assert c.outcome == "degraded" and "wa1" in c.lost
    assert cell(K1, dst, sm=A, dm=U, compat="preflight").outcome == "refused"


@pytest.mark.parametrize("src", NEW)
@pytest.mark.parametrize("dst", [K1, K0])
def test_row_6_new_to_old_fails_at_length(src: str, dst: str) -> None:
    c = cell(src, dst)
    assert c.outcome == "fails_after_stop" and c.step == "cpreg_vmstate_array_len"
    assert c.register == "PSCI_VERSION"
    pre = preflight_never_fails_after_stop(src, dst, "default", A, A)
    assert pre.outcome == "refused" and pre.register == "PSCI_VERSION"


def _drop_corner(
    src: str, dst: str, src_mit: str, dst_mit: str, pin: int | None = None
) -> tuple[Arm64Guest, Arm64Machine, Arm64Machine]:
    """Classic-merge DROP: destination exposes enough extra sysregs that src_len <= dst_len."""
    source = Arm64Machine(
        load_profile(src).with_mitigation(parse_mitigation(src_mit)), psci_pin=pin
    )
    source.start()
    guest = Arm64Guest()
    guest.boot(source.port(0), source.protection())
    roomy = load_profile(dst, {"sysregs": {"count": 143}}).with_mitigation(
        parse_mitigation(dst_mit)
    )
    dest = Arm64Machine(roomy)
    report = dest.load(source.save(), MergeMode.CLASSIC)
    assert R.KVM_REG_ARM_PSCI_VERSION in [r for r, _ in report.dropped]
    dest.start()
    return guest, source, dest


def test_row_6_drop_corner_then_rows_2_3() -> None:
    guest, _, dest = _drop_corner(K2, K1, A, U)
    assert guest.report(dest.protection())["lost"] == ["wa1"]  # row 2 after the drop
    guest, _, dest = _drop_corner(K2, K0, A, A)
    assert guest.report(dest.protection())["lost"] == ["wa1"]  # row 3 after the drop


@pytest.mark.parametrize("src", NEW)
def test_row_6_tolerant_qemu_fails_at_merge(src: str) -> None:
    source = Arm64Machine(load_profile(src))
    roomy = Arm64Machine(load_profile(K1, {"sysregs": {"count": 143}}))
    with pytest.raises(CpuLoadError) as info:
        roomy.load(source.save(), MergeMode.STRICT)
    assert info.value.step == "post_load merge"
    assert info.value.rid == R.KVM_REG_ARM_PSCI_VERSION


@pytest.mark.parametrize(("src", "dst"), [(K2, K3), (K4, K5), (K5, K6), (K6, K7), (K5, K5)])
def test_row_7_new_to_new_pins_stream_version(src: str, dst: str) -> None:
    c = cell(src, dst)
    assert c.outcome == "migrates"
    assert c.psci_after == c.psci_before  # no upgrade even if the destination's is newer
    assert preflight_never_fails_after_stop(src, dst, "default", A, A).outcome == "migrates"


def test_row_8_psci_1_3_to_older_hosts() -> None:
    c = cell(K6, K5)
    assert (c.outcome, c.step, c.register) == ("fails_after_stop", "set_one_reg", "PSCI_VERSION")
    for dst in (K2, K3, K4):
        c = cell(K6, dst)
        assert c.outcome == "fails_after_stop" and c.step == "cpreg_vmstate_array_len"
    pre = cell(K6, K5, compat="preflight")
    assert pre.outcome == "refused" and pre.register == "PSCI_VERSION" and "1.3" in pre.reason


@pytest.mark.parametrize("src", NEW)
@pytest.mark.parametrize("dst", NEW)
def test_row_9_explicit_0_2_between_new_hosts(src: str, dst: str) -> None:
    c = cell(src, dst, "0.2")
    # A newer source may list registers an older destination lacks (row 6 / 6.5); 0.2 itself
    # is accepted by every K2+ destination.
    src_fw, dst_fw = (set(load_profile(p).arm64()[0].fw_regs) for p in (src, dst))
    same_regs = src_fw == dst_fw
    only_bmap2 = src_fw - dst_fw == {R.KVM_REG_ARM_VENDOR_HYP_BMAP_2}  # tolerated when 0
    if NEW.index(src) <= NEW.index(dst) or same_regs:
        assert c.outcome == "migrates" and c.psci_after == "0.2"
    else:
        assert c.outcome == "fails_after_stop"
    pre = preflight_never_fails_after_stop(src, dst, "0.2", A, A)
    assert (pre.outcome == "migrates") is (c.outcome == "migrates" or only_bmap2)


@pytest.mark.parametrize("src", K3PLUS)
def test_row_9_conservative_false_failure(src: str) -> None:
    c = cell(src, src, "0.2", A, U)
    assert c.outcome == "fails_after_stop" and c.register == "SMCCC_ARCH_WORKAROUND_1"
    assert c.guest_before["wa1"] == "vulnerable"  # the guest never had SMCCC 1.1


def test_row_10_explicit_0_2_new_to_old() -> None:
    c = cell(K2, K1, "0.2")
    assert c.outcome == "fails_after_stop" and c.step == "cpreg_vmstate_array_len"
    guest, _, dest = _drop_corner(K2, K1, A, A, pin=0x2)
    assert dest.psci_version() == 0x10000  # OK+up once the register is dropped
    assert guest.report(dest.protection())["lost"] == []


def test_row_11_explicit_0_2_new_to_pre_spectre() -> None:
    c = cell(K2, K0, "0.2")
    assert c.outcome == "fails_after_stop" and c.step == "cpreg_vmstate_array_len"
    guest, _, dest = _drop_corner(K2, K0, A, A, pin=0x2)
    assert dest.psci_version() == 0x2
    assert guest.report(dest.protection())["lost"] == []


@pytest.mark.parametrize(("dm", "lost"), [(A, []), (N, []), (U, ["wa1"])])
def test_row_12_old_source_destination_pinned_0_2(dm: str, lost: list[str]) -> None:
    source = Arm64Machine(load_profile(K1))
    source.start()
    guest = Arm64Guest()
    guest.boot(source.port(0), source.protection())
    dest = Arm64Machine(load_profile(K2).with_mitigation(parse_mitigation(dm)), psci_pin=0x2)
    dest.load(source.save(), MergeMode.CLASSIC)
    dest.start()
    assert dest.psci_version() == 0x2  # OK-down
    assert guest.report(dest.protection())["lost"] == lost


def test_row_13_stream_wins_over_destination_pin() -> None:
    source = Arm64Machine(load_profile(K5))
    dest = Arm64Machine(load_profile(K6), psci_pin=0x10003)
    dest.load(source.save(), MergeMode.CLASSIC)
    assert dest.psci_version() == 0x10001


@pytest.mark.parametrize(("dst", "pin"), [(K6, 0x10004), (K5, 0x10003), (K1, 0x2)])
def test_row_14_unsupported_pin_fails_at_init(dst: str, pin: int) -> None:
    with pytest.raises(Arm64InitError):
        Arm64Machine(load_profile(dst), psci_pin=pin)


# --- 6.3 WA_1 (and WA_3) sub-matrix -----------------------------------------------------------

LEVEL = {U: 0, A: 1, N: 2}


@pytest.mark.parametrize("wa", ["wa1", "wa3"])
@pytest.mark.parametrize("src", [U, A, N])
@pytest.mark.parametrize("dst", [U, A, N])
def test_section_6_3(wa: str, src: str, dst: str) -> None:
    others = ",".join(f"{w}=not_required" for w in ("wa1", "wa2", "wa3") if w != wa)
    c = cell(K4, K4, sm=f"{wa}={src},{others}", dm=f"{wa}={dst},{others}")
    if LEVEL[src] <= LEVEL[dst]:
        assert c.outcome == "migrates"
    else:
        reg = {"wa1": "SMCCC_ARCH_WORKAROUND_1", "wa3": "SMCCC_ARCH_WORKAROUND_3"}[wa]
        assert (c.outcome, c.step, c.register) == ("fails_after_stop", "set_one_reg", reg)
        pre = cell(K4, K4, sm=f"{wa}={src},{others}", dm=f"{wa}={dst},{others}", compat="preflight")
        assert pre.outcome == "refused" and pre.register == reg


# --- 6.4 WA_2 sub-matrix ------------------------------------------------------------------------

WA2_HOST = {0: "wa2=not_avail", 3: "wa2=not_required"}
REST = "wa1=not_required,wa3=not_required"


@pytest.mark.parametrize(
    ("src", "dst", "ok"), [(0, 0, True), (0, 3, True), (3, 0, False), (3, 3, True)]
)
def test_section_6_4(src: int, dst: int, ok: bool) -> None:
    c = cell(K4, K4, sm=f"{WA2_HOST[src]},{REST}", dm=f"{WA2_HOST[dst]},{REST}")
    assert (c.outcome == "migrates") is ok
    if not ok:
        assert c.register == "SMCCC_ARCH_WORKAROUND_2" and c.step == "set_one_reg"


def test_section_6_4_ssbs_host_refuses_firmware_mitigated_guest() -> None:
    c = cell(K4, K4, sm="wa2=avail,wa1=avail,wa3=avail", dm="wa2=avail,wa1=avail,wa3=avail,ssbs")
    assert c.outcome == "fails_after_stop" and c.register == "SMCCC_ARCH_WORKAROUND_2"


def _with_wa2(state: Arm64State, value: int) -> Arm64State:
    vcpu = state.vcpus[0]
    values = tuple(
        value if r == R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2 else v for r, v in vcpu.cpregs.items()
    )
    return Arm64State(
        (
            Arm64VcpuState(
                vcpu.index, vcpu.powered_off, vcpu.core, CpregList(vcpu.cpregs.ids, values)
            ),
        )
    )


@pytest.mark.parametrize("bad", [0x11, 0x4, 0x20])
def test_section_6_4_invalid_encodings(bad: int) -> None:
    state = _with_wa2(Arm64Machine(load_profile(K4)).save(), bad)
    dest = Arm64Machine(load_profile(K4, {"mitigation": "not_required"}))
    with pytest.raises(CpuLoadError) as info:
        dest.load(state, MergeMode.CLASSIC)
    assert info.value.errno == errno.EINVAL
    assert info.value.rid == R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2


@pytest.mark.parametrize(("dst_wa2", "status"), [(A, Status.MITIGATED), (N, Status.UNAFFECTED)])
def test_section_6_4_dynamic_source_enabled_value(dst_wa2: str, status: Status) -> None:
    """A 5.3-5.9 source whose host mitigates dynamically sends WA_2 = AVAIL|ENABLED (0x12):
    kvm_reset_vcpu turned the vCPU's flag on, kvm_arm_get_fw_reg reports it.  A 5.10+
    destination whose level is NOT_REQUIRED (3) narrows 0x12 to 3 and accepts it; its WA_2
    then reads 3, and the guest (which chose firmware calls at boot) stays protected."""
    src = Arm64Machine(load_profile(K3).with_mitigation(parse_mitigation(A)))
    guest = Arm64Guest()
    view = guest.boot(src.port(), src.protection())
    assert view.decision(Workaround.WA2) is Decision.FIRMWARE_CALLS
    state = src.save()
    assert state.vcpus[0].cpregs.get(R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2) == 0x12
    rest = "wa1=not_required,wa3=not_required"
    dest = Arm64Machine(load_profile(K4).with_mitigation(
        parse_mitigation(f"wa2={dst_wa2},{rest}")))
    dest.load(state)
    dest.start()
    assert dest.port().get_one_reg(R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2) == 3
    after = guest.status_on(dest.protection())
    assert after[Workaround.WA2] is status and after[Workaround.WA2].protected


# --- 6.5 presence -------------------------------------------------------------------------------


def test_section_6_5_bitmaps_appear_and_bmap2_tolerance() -> None:
    c = cell(K4, K5)
    assert c.outcome == "migrates"
    assert cell(K7, K6).outcome == "fails_after_stop"  # classic: length gate
    assert cell(K7, K6, compat="preflight").outcome == "migrates"  # BMAP_2 == 0 tolerated
