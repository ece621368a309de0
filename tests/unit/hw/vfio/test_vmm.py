"""The QEMU-like VMM side: refusals up front, failure handling."""

from __future__ import annotations

import pytest

from vmferry.errors import MigrationRefused
from vmferry.hw.vfio import DeviceState, VfioError, VfioMigrationDevice, VmmDevice, preflight
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


def test_read_view_reads_what_read_would() -> None:
    """STOP_COPY chunks as views: the same bytes, positions and end of stream as reads."""
    a, b = make("pds", state_mib=0.25, seed=5), make("pds", state_mib=0.25, seed=5)
    for dev in (a, b):
        dev.run(30)
        dev.set_state(S.STOP)
    by_read = b.set_state(S.STOP_COPY)
    by_view = a.set_state(S.STOP_COPY)
    assert by_read is not None and by_view is not None
    copied = b"".join(iter(lambda: by_read.read(5000), b""))
    views = list(iter(lambda: by_view.read_view(5000), b""))
    assert b"".join(views) == copied and all(v.readonly and len(v) <= 5000 for v in views)
    assert by_view.pos == by_read.pos == len(copied)
    by_view.close()
    a.set_state(S.STOP)  # the session ends: the file is disabled
    with pytest.raises(VfioError, match=r"EINVAL.*beyond the freed buffer"):  # as read()
        by_view.read_view(10)
    resuming = a.set_state(S.RESUMING)
    assert resuming is not None
    with pytest.raises(VfioError, match="EBADF"):
        resuming.read_view(10)
