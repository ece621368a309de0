"""Issue 13: a restarted daemon answers at once; its VMs are ``recovering`` while they
are rebuilt in the background, and the rebuild is said in the log and in ``vm show``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from vmferry.cli.vm import vm_table
from vmferry.errors import ApiError
from vmferry.host.daemon import HostDaemon
from vmferry.host.store import Store
from vmferry.machine.vm import VM

DEF = {"name": "g", "memory_mib": 4, "vcpus": 1}


def test_issue13_restart_answers_while_vms_are_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "host.sqlite3")
    store.put_vm("g", DEF, "running")
    store.close()
    d = HostDaemon("R", tmp_path)
    release, building = threading.Event(), threading.Event()
    real = HostDaemon.build_vm

    def slow_build(self: HostDaemon, definition: Mapping[str, Any]) -> VM:
        building.set()
        assert release.wait(30)
        return real(self, definition)

    monkeypatch.setattr(HostDaemon, "build_vm", slow_build)
    try:
        d.recover(settle=False)
        hosted = d.get_vm("g")
        assert hosted.runstate == "recovering" and "being rebuilt" in hosted.note
        caplog.set_level(logging.INFO, logger="vmferry.host")
        worker = threading.Thread(target=d.settle_recovered)
        worker.start()
        assert building.wait(30)
        # the daemon answers meanwhile, and refuses what cannot be done yet
        assert hosted.to_json()["runstate"] == "recovering"
        for action in (lambda: d.set_running("g", True), lambda: d.destroy("g")):
            with pytest.raises(ApiError) as err:
                action()
            assert err.value.status == 409
        release.set()
        worker.join(30)
        assert hosted.runstate == "paused" and hosted.memory_lost and hosted.vm is not None
        assert "rebuilt from its definition" in hosted.note
        assert "recovering 1 VMs in the background: g" in caplog.text
        assert "VM g: the host daemon restarted" in caplog.text
        shown = hosted.to_json()
        rows = {str(r[0]).rstrip(":"): str(r[1]) for r in zip(*(c.cells for c in
                                                                vm_table(shown).columns),
                                                              strict=True)}
        assert "rebuilt from its definition" in rows["Note"]
        assert rows["Memory lost"].startswith("yes")
    finally:
        release.set()
        d.shutdown()
