"""Issue 13: the QEMU error arm64 pre-flight predicts is the one QEMU 7.2 prints.

QEMU 7.2 checks ``cpreg_vmstate_array_len`` with ``VMSTATE_INT32_POSITIVE_LE`` against the
destination's own cpreg list length (no allowance for extra registers: that came with the
2025/2026 fix), so a 4.16 destination with 60 registers says ``<= 60``; and it tolerates
no register it does not know, so every unknown one counts.
"""

from __future__ import annotations

from vmferry.hw.kvm import regs as R
from vmferry.machine.arm64 import Arm64Machine, CpregList, qemu72_load_error
from vmferry.machine.arm64_compat import SourceState, Verdict, decide, describe_destination
from vmferry.machine.profiles import load_profile


def test_issue13_preflight_quotes_qemu72_length_error() -> None:
    src = Arm64Machine(load_profile("arm64-linux-6.13"))
    dest = describe_destination(load_profile("arm64-linux-4.16"))
    state = src.save()
    incoming = state.vcpus[0].cpregs
    unknown = [r for r in incoming.ids if r not in set(dest.own.ids)]
    d = decide(SourceState("arm64-linux-6.13", state, None, src.protection()), dest)
    assert d.verdict is Verdict.REFUSE
    n, own = len(incoming.ids), len(dest.own.ids)
    assert own == 60 and n > own
    assert f"Invalid value {n} expecting positive value <= {own}" in d.reason
    assert "<= 70" not in d.reason
    assert f"{len(unknown)} of them unknown there" in d.reason
    assert "Failed to load cpu:cpreg_vmstate_array_len" in d.reason
    assert "load of migration failed: Invalid argument" in d.reason


def test_issue13_qemu72_post_load_and_silent_drop() -> None:
    psci, wa1 = R.KVM_REG_ARM_PSCI_VERSION, R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1
    own = CpregList((1, 2, wa1), (0, 0, 0))
    # an unknown register sorting before a known one: cpu_post_load returns -1 (EPERM)
    before = CpregList((1, 2, psci), (0, 0, 0x10001))
    lines = qemu72_load_error(own, before)
    assert lines[-1] == "load of migration failed: Operation not permitted"
    assert "error while loading state for instance 0x0 of device 'cpu'" in lines
    # an unknown register after the last known one is dropped without a word
    own2 = CpregList((1, 2), (0, 0))
    assert qemu72_load_error(own2, CpregList((1, psci), (0, 0x10001))) == ()
