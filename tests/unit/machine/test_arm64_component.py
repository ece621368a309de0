"""The arm64 component through the VM Component protocol: save on one host, load on another."""

from __future__ import annotations

import pytest

from vmferry.errors import StreamDecodeError
from vmferry.machine.arm64 import CpuLoadError, MergeMode
from vmferry.machine.arm64_component import Arm64Component
from vmferry.machine.profiles import load_profile


def booted(name: str, mitigation: str = "avail") -> Arm64Component:
    comp = Arm64Component(load_profile(name, {"mitigation": mitigation}), 2)
    comp.boot()
    return comp


def test_round_trip_keeps_guest_view_and_reports() -> None:
    src = booted("arm64-linux-5.19")
    dst = Arm64Component(load_profile("arm64-linux-6.13"), 2)
    dst.load_state(src.save_state())
    assert dst.guest.view == src.guest.view
    report = dst.report()
    assert report["guest"] == src.report()["guest"]
    assert dst.machine.psci_version() == 0x10001 and dst.machine.started


def test_refused_load_and_silent_loss_show_in_report() -> None:
    src = booted("arm64-linux-5.19")
    dst = Arm64Component(load_profile("arm64-linux-5.19", {"mitigation": "not_avail"}), 2,
                         merge=MergeMode.CLASSIC)
    with pytest.raises(CpuLoadError):
        dst.load_state(src.save_state())
    assert not dst.machine.started
    old = booted("arm64-linux-4.16")
    weak = Arm64Component(load_profile("arm64-linux-4.16", {"mitigation": "not_avail"}), 2,
                          merge=MergeMode.CLASSIC)
    weak.load_state(old.save_state())
    guest = weak.report()["guest"]
    assert isinstance(guest, dict) and guest["lost"] == ["wa1"]


@pytest.mark.parametrize("cut", [0, 5, 11, 30, -3])
def test_bad_records_are_typed(cut: int) -> None:
    data = booted("arm64-linux-5.19").save_state()
    with pytest.raises(StreamDecodeError):
        Arm64Component(load_profile("arm64-linux-5.19"), 2).load_state(data[:cut])
