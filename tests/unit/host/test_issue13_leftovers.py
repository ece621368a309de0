"""Issue 13's smaller items: `vm save` does not overwrite silently, a restore-name
conflict is a 409 ``VmExists``."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.unit.host.apphost import app_host

from vmferry.errors import ApiError
from vmferry.host.files import ImagesDir


def test_issue13_save_refuses_an_existing_file_unless_forced(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as a:
        a.client().post("/v1/vms", {"definition": {"name": "v", "memory_mib": 8},
                                    "start": True})
        images = a.daemon.images.root
        (images / "old.vmf").write_bytes(b"precious")
        with pytest.raises(ApiError) as err:
            a.client().post("/v1/vms/v/save", {"path": "old.vmf"})
        assert (err.value.status, err.value.kind) == (409, "FileExists")
        assert "--force" in err.value.message
        assert (images / "old.vmf").read_bytes() == b"precious"
        assert a.client().get("/v1/vms/v")["runstate"] == "running"
        assert sorted(p.name for p in images.iterdir()) == ["old.vmf"]  # no partial file
        out = a.client().post("/v1/vms/v/save", {"path": "old.vmf", "force": True})
        assert out["bytes"] > 8 and (images / "old.vmf").read_bytes()[:8] != b"precious"


def test_issue13_save_commit_refuses_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    images = ImagesDir(tmp_path / "images")
    out = images.create("a.vmf", overwrite=False)
    out.file.write(b"mine")
    (images.root / "a.vmf").write_bytes(b"theirs")
    with pytest.raises(ApiError) as err:
        out.commit()
    assert err.value.kind == "FileExists"
    assert (images.root / "a.vmf").read_bytes() == b"theirs"
    assert sorted(p.name for p in images.root.iterdir()) == ["a.vmf"]


def test_issue13_restore_name_conflict_is_409_vm_exists(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as a:
        a.client().post("/v1/vms", {"definition": {"name": "v", "memory_mib": 8},
                                    "start": True})
        a.client().post("/v1/vms/v/save", {"path": "v.vmf"})
        with pytest.raises(ApiError) as err:
            a.client().post("/v1/restore", {"path": "v.vmf"})
        assert (err.value.status, err.value.kind) == (409, "VmExists")
        assert "exists" in err.value.message


def test_issue13_arch_keys_are_typed_and_unknown_ones_named(tmp_path: Path) -> None:
    from vmferry.host.daemon import HostDaemon

    d = HostDaemon("T", tmp_path)
    try:
        cases = [
            ({"name": "a", "dirty_log": "get"}, "'dirty_log' is a key of arch x86_64"),
            ({"name": "a", "arch": "x86_64", "dirty_log": "fast"}, "dirty_log"),
            ({"name": "a", "arch": "arm64", "psci": "2.0"}, "psci"),
            ({"name": "a", "arch": "arm64", "psci": "1.0", "tce_windows": []},
             "'tce_windows' is a key of arch pseries"),
            ({"name": "a", "arch": "pseries", "device_tree": {"mode": "nope"}},
             "device_tree.mode"),
            ({"name": "a", "arch": "pseries", "device_tree": {"user_spaces": "held"}},
             "device_tree.user_spaces"),
            ({"name": "a", "memory_mib": 8, "dirtylog": "get"}, "dirtylog"),
        ]
        for definition, named in cases:
            with pytest.raises(ApiError) as err:
                d.check_definition(definition)
            assert err.value.status == 400 and named in err.value.message, (definition,
                                                                             err.value.message)
        assert d.check_definition({"name": "a", "arch": "pseries", "memory_mib": 64,
                                   "device_tree": {"mode": "correct"}}).arch == "pseries"
    finally:
        d.shutdown()
