"""Issue 14 item 5: the VFIO state version a migration writes is the one the destination
announced at pre-flight -- version 1 for a destination of the release before, which
announces none -- and a destination of this release loads either."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from tests.unit.migration.test_engine import Link
from tests.unit.migration.test_vfio_handler import HISI, MLX5, caps, handler, running_vm
from vmferry.hw.vfio.drivers.hisi_acc import ACC_DEV_MAGIC_V1, ACC_DEV_MAGIC_V2
from vmferry.machine.handlers import DeviceData
from vmferry.migration.context import Status
from vmferry.migration.source import MigrationParams

MAGIC = {("acc0", 1): struct.pack("<Q", ACC_DEV_MAGIC_V1),
         ("acc0", 2): struct.pack("<Q", ACC_DEV_MAGIC_V2),
         ("nic0", 1): b"MLXI", ("nic0", 2): b"MLI2"}  # fmt: skip


@pytest.mark.parametrize("device", [MLX5, HISI], ids=["mlx5", "hisi_acc"])
@pytest.mark.parametrize(("announce", "version"), [(False, 1), (True, 2)])
def test_item5_migration_writes_what_the_destination_reads(
    device: dict[str, Any], announce: bool, version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = running_vm(device)
    dest = caps(device)
    if not announce:
        del dest["vfio"]["state_versions"]  # a destination of the release before
    saved: list[Any] = []
    h = handler(vm)
    complete = h.save_complete

    def recording() -> Any:
        for piece in complete():
            saved.append(piece)
            yield piece

    monkeypatch.setattr(h, "save_complete", recording)
    link = Link(vm, MigrationParams(offline=True))
    assert link.src.preflight(dest) == []
    assert {d.driver.write_version for d in h.devices.values() if d.driver} == {version}
    out = link.run()
    assert link.src.stats.status is Status.COMPLETED
    assert out["ack"]["digests"]["handler:vfio"] == out["source"]["handler:vfio"]
    data = b"".join(bytes(p.data) for p in saved if isinstance(p, DeviceData))
    ident = device["id"]
    assert MAGIC[ident, version] in data[:64] and MAGIC[ident, 3 - version] not in data
