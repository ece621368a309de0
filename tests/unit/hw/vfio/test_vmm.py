"""The QEMU-like VMM side: refusals up front, failure handling."""

from __future__ import annotations

import pytest

from vmferry.errors import MigrationRefused
from vmferry.hw.vfio import DeviceState, VfioMigrationDevice, VmmDevice, preflight
from vmferry.testing.vfio import make

S = DeviceState


def test_preflight_refuses_with_reason() -> None:
    caps = {"nic0": make("mlx5").capability(), "acc0": make("hisi_acc").capability()}
    preflight(caps, dict(caps))
    with pytest.raises(MigrationRefused, match=r"acc0.*no such device"):
        preflight(caps, {"nic0": caps["nic0"]})
    with pytest.raises(MigrationRefused, match=r"acc0.*qp_num"):
        preflight(caps, {**caps, "acc0": make("hisi_acc", qp_num=16).capability()})
    with pytest.raises(MigrationRefused, match=r"nic0.*state_size"):
        preflight(caps, {**caps, "nic0": make("mlx5", state_mib=0.125).capability()})


def test_device_without_migration_is_refused() -> None:
    with pytest.raises(MigrationRefused, match="no VFIO migration support"):
        VmmDevice(VfioMigrationDevice(None, name="gpu0"))


def test_failed_resume_resets_the_destination() -> None:
    dst = make()
    vmm = VmmDevice(dst)
    vmm.load_setup()
    vmm.load_data(b"\x00" * 16)  # an empty record: no device image
    vmm.load_cleanup()
    with pytest.raises(Exception, match="final device image"):
        vmm.start_prepare()
    assert dst.get_state() == S.RUNNING and vmm.state == S.RUNNING  # reset by recovery
    assert all(f.disabled for f in dst.files)
