"""Issue 14 item 6: one faulty-mode mechanism for the five models (``vmferry.hw.modes``)."""

from __future__ import annotations

import pytest

from vmferry.analysis.explore.scenarios import all_scenarios
from vmferry.errors import ConfigError
from vmferry.guest.mobility import MOBILITY_MODES, MODES, options_of
from vmferry.hw.iommu.errors import IommuError
from vmferry.hw.iommu.modes import PROBE_MODES, ProbeMode
from vmferry.hw.kvm.arm64_host import FW_MODES, FwFaults
from vmferry.hw.modes import Modes, Switch, UnknownMode
from vmferry.hw.spapr.tce import TCE_MODES, Quirk, quirks_of
from vmferry.hw.vfio.modes import VFIO_MODES, device_options

ALL = {"vfio": VFIO_MODES, "arm64": FW_MODES, "tce": TCE_MODES, "lpm": MOBILITY_MODES,
       "iommu": PROBE_MODES}
#: explorer scenario -> the model whose modes it runs
SCENARIO_MODEL = {"iommu-probe": "iommu", "tce-indirect": "tce", "lpm-update": "lpm",
                  "vfio-data-stream": "vfio"}


@pytest.mark.parametrize("model", sorted(ALL))
def test_item6_each_model_declares_switches_and_a_correct_default(model: str) -> None:
    modes = ALL[model]
    assert isinstance(modes, Modes)
    assert modes.parse(modes.default).switches == frozenset()
    for preset in modes.names():
        assert modes.parse(preset).switches <= set(modes.switches)
    some = next(iter(modes.switches))
    assert some in modes.parse(f"{modes.default}+{some}")
    with pytest.raises(UnknownMode):
        modes.parse("no-such-preset")
    with pytest.raises(ConfigError):
        modes.parse(f"{modes.default}+no_such_switch")


@pytest.mark.parametrize("scenario", sorted(SCENARIO_MODEL))
def test_item6_scenario_mode_names_keep_working(scenario: str) -> None:
    modes = ALL[SCENARIO_MODEL[scenario]]
    for mode in all_scenarios()[scenario].modes:
        assert modes.parse(mode).name == mode


def test_item6_presets_mean_what_they_meant() -> None:
    assert quirks_of("no_align_recheck") == {Quirk.DOUBLE_READ, Quirk.NO_ALIGN_RECHECK}
    assert quirks_of("correct+double_read") == {Quirk.DOUBLE_READ}
    assert options_of("correct+busy_abort") == MODES["busy_abort"]
    assert options_of("upstream+no_pf_skip") == MODES["no_pf_skip"]
    assert not MODES["correct"].merge_readd and MODES["merge_readd"].merge_readd
    assert FwFaults.parse("correct+no_config_lock") == FwFaults(no_config_lock=True)
    assert FwFaults.parse("per_vcpu_psci") == FwFaults(per_vcpu_psci=True)
    assert device_options("correct+stale_fd+error_sentinel_loop") == (
        frozenset({"stale_fd"}), "error_sentinel_loop")
    assert device_options("correct") == (frozenset(), "fixed")
    assert ProbeMode.parse("v6_15+relock_no_recheck").relock_no_recheck


def test_item6_unknown_names_are_typed_errors_naming_the_model() -> None:
    with pytest.raises(ConfigError, match="unknown TCE mode 'nonsense'"):
        quirks_of("nonsense")
    with pytest.raises(IommuError, match="iommu-probe"):
        ProbeMode.parse("v6_15+bogus")
    with pytest.raises(UnknownMode, match="LPM"):
        options_of("upstream+bogus")


def test_item6_a_preset_naming_an_unknown_switch_is_refused_at_declaration() -> None:
    with pytest.raises(ValueError, match="unknown"):
        Modes("m", [Switch("a", "does a")], {"correct": (), "bad": {"b"}}, "correct")
    with pytest.raises(ValueError, match="default"):
        Modes("m", [Switch("a", "does a")], {"x": {"a"}}, "correct")
    assert "does a" in Modes("m", [Switch("a", "does a", "H1")], {"c": ()}, "c").describe("c+a")
