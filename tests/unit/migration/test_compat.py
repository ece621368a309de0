"""Pre-flight: destination description by probing, JSON round trip, decisions."""

from __future__ import annotations

import json

import pytest

from vmferry.errors import MalformedRecord
from vmferry.guest.psci_client import Arm64Guest
from vmferry.hw.kvm import regs as R
from vmferry.machine.arm64 import Arm64Machine
from vmferry.machine.arm64_compat import (
    DestinationCaps,
    Verdict,
    decide,
    describe_destination,
    describe_source,
)
from vmferry.machine.profiles import load_profile


def booted(name: str, mitigation: str = "avail", pin: int | None = None
           ) -> tuple[Arm64Machine, Arm64Guest]:
    m = Arm64Machine(load_profile(name, {"mitigation": mitigation}), psci_pin=pin)
    m.start()
    g = Arm64Guest()
    g.boot(m.port(0), m.protection())
    return m, g


def test_probed_acceptance_matches_kernel_rules() -> None:
    caps = describe_destination(load_profile("arm64-linux-5.19"))
    psci = caps.accepts[R.KVM_REG_ARM_PSCI_VERSION]
    assert sorted(psci.values) == [0x2, 0x10000, 0x10001]
    assert sorted(caps.accepts[R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1].values) == [0, 1]
    assert sorted(caps.accepts[R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2].values) == [
        0, 1, 2, 3, 0x12]
    assert caps.accepts[R.KVM_REG_ARM_VENDOR_HYP_BMAP].mask == 0x3


def test_caps_json_round_trip() -> None:
    caps = describe_destination(load_profile("arm64-linux-6.15"))
    again = DestinationCaps.from_json(json.loads(json.dumps(caps.to_json())))
    assert again == caps
    with pytest.raises(MalformedRecord, match="accepts: missing"):
        DestinationCaps.from_json({"profile": "x"})


def test_refusal_names_register_value_reason() -> None:
    src, guest = booted("arm64-linux-6.13")
    d = decide(describe_source(src, guest), describe_destination(load_profile("arm64-linux-5.19")))
    assert d.verdict is Verdict.REFUSE
    assert (d.register, d.value) == (R.KVM_REG_ARM_PSCI_VERSION, 0x10003)
    assert "PSCI 1.3" in d.reason
    assert d.to_json()["register"] == "PSCI_VERSION"


def test_loss_is_refused_unless_allowed() -> None:
    src, guest = booted("arm64-linux-4.16")
    dest = describe_destination(load_profile("arm64-linux-5.19", {"mitigation": "not_avail"}))
    refused = decide(describe_source(src, guest), dest)
    assert refused.verdict is Verdict.REFUSE and refused.loss_path.startswith("6.6/1")
    allowed = decide(describe_source(src, guest), dest, allow_degraded=True)
    assert allowed.verdict is Verdict.DEGRADED
    assert [w.key for w in allowed.lost] == ["wa1"]


def test_proceed_notes_psci_upgrade() -> None:
    src, guest = booted("arm64-linux-4.16")
    d = decide(describe_source(src, guest), describe_destination(load_profile("arm64-linux-6.13")))
    assert d.verdict is Verdict.PROCEED
    assert d.notes and "upgrade 1.0 -> 1.3" in d.notes[0]
