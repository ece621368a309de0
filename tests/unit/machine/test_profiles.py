"""Host profile loading: shipped files, overrides, typed errors."""

from __future__ import annotations

from importlib import resources

import pytest

from vmferry.errors import ConfigError
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import HostMitigation, WaLevel
from vmferry.machine.profiles import list_profiles, load_profile, parse_mitigation, parse_profile

ERAS = {"arm64-linux-4.15": (0, "K0"), "arm64-linux-4.16": (0, "K1"),
        "arm64-linux-4.17": (1, "K2"), "arm64-linux-4.18": (1, "K2.1"),
        "arm64-linux-5.3": (3, "K3"),
        "arm64-linux-5.17": (4, "K4"), "arm64-linux-5.19": (7, "K5"),
        "arm64-linux-6.13": (7, "K6"), "arm64-linux-6.15": (8, "K7")}


def test_every_era_ships() -> None:
    assert list_profiles() == list(ERAS)
    for name, (n_fw, era) in ERAS.items():
        prof = load_profile(name)
        caps, mitigation = prof.arm64()
        assert (len(caps.fw_regs), prof.era, prof.arch) == (n_fw, era, "arm64")
        assert mitigation == HostMitigation.uniform(WaLevel.AVAIL)
        assert R.KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3 + 1 not in caps.fw_regs  # never WA_4


def test_unverified_facts_are_marked() -> None:
    for name in ("arm64-linux-4.16", "arm64-linux-4.17", "arm64-linux-6.15"):
        assert load_profile(name).unverified
        text = (resources.files("vmferry") / "profiles" / f"{name}.toml").read_text()
        assert "[unverified" in text


def test_overrides() -> None:
    prof = load_profile("arm64-linux-5.19", {"mitigation": {"wa1": "not_avail"}})
    assert prof.arm64()[1].wa1 is WaLevel.NOT_AVAIL
    assert prof.arm64()[1].wa3 is WaLevel.AVAIL
    assert load_profile("arm64-linux-5.19", {"mitigation": "not_required"}).arm64()[1] == \
        HostMitigation.uniform(WaLevel.NOT_REQUIRED)
    assert len(load_profile("arm64-linux-5.19", {"sysregs": {"count": 10}}).arm64()[0].sysregs) \
        == 10


def test_errors() -> None:
    with pytest.raises(ConfigError, match="unknown host profile"):
        load_profile("arm64-linux-0.1")
    with pytest.raises(ConfigError, match="bad TOML"):
        parse_profile("arch = ")
    with pytest.raises(ConfigError, match="missing key 'arch'"):
        parse_profile("name = 'x'")
    with pytest.raises(ConfigError, match="no parser"):
        parse_profile("arch = 'mips'")
    with pytest.raises(ConfigError, match="mitigation"):
        load_profile("arm64-linux-5.19", {"mitigation": {"wa1": "maybe"}})
    with pytest.raises(ConfigError, match="capabilities"):
        load_profile("arm64-linux-5.19", {"psci": {"latest": "one"}})
    with pytest.raises(ConfigError):
        parse_mitigation("wa9=avail")


def test_parse_mitigation() -> None:
    assert parse_mitigation("avail") == HostMitigation.uniform(WaLevel.AVAIL)
    mit = parse_mitigation("wa1=avail,wa2=not_required,wa3=not_avail,ssbs")
    assert (mit.wa1, mit.wa2, mit.wa3, mit.ssbs_everywhere) == (
        WaLevel.AVAIL, WaLevel.NOT_REQUIRED, WaLevel.NOT_AVAIL, True)
