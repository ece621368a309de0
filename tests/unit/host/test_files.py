"""Files stay where they belong (issue 10, Why 5) and a failed save undoes itself (Why 10)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from tests.unit.host.apphost import AppHost, app_host

from vmferry.errors import ApiError, ConfigError
from vmferry.host.files import ImagesDir
from vmferry.migration.source import SourceSession

MLX5 = {"id": "nic0", "driver": "mlx5", "state_mib": 1, "dma_region": [0x100000, 0x10000],
        "seed": 7}


def make_vm(host: AppHost, name: str = "v", **extra: Any) -> None:
    host.client().post("/v1/vms", {"definition": {"name": name, "memory_mib": 8, **extra},
                                   "start": True})


def status_of(host: AppHost, path: str, body: dict[str, Any]) -> tuple[int, str, str]:
    with pytest.raises(ApiError) as err:
        host.client().post(path, body)
    return err.value.status, err.value.kind, err.value.message


def test_issue10_5_save_path_traversal(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    with app_host(tmp_path / "A") as a:
        make_vm(a)
        images = a.daemon.images.root
        (images / "link").symlink_to(tmp_path)
        (images / "filelink").symlink_to(victim)
        state = a.daemon.state_dir
        for target in ("../../victim", str(victim), str(state / "host.sqlite3"),
                       "link/victim", "../host.sqlite3", str(images / ".." / "token")):
            status, _, _ = status_of(a, "/v1/vms/v/save", {"path": target})
            assert status in (403, 404), target
        assert victim.read_text() == "precious"
        # a symlink as the last component is neither followed nor replaced
        assert status_of(a, "/v1/vms/v/save", {"path": "filelink"})[0] == 409
        assert victim.read_text() == "precious" and (images / "filelink").is_symlink()
        out = a.client().post("/v1/vms/v/save", {"path": "v.vmf"})
        assert out["path"] == str(images / "v.vmf") and out["bytes"] > 0
        assert a.client().get("/v1/vms")[0]["runstate"] == "running"
        assert a.client().get("/v1/host")  # the daemon's own files are intact


def test_issue10_5_restore_refuses_fifos_foreign_files_and_echoes_nothing(
    tmp_path: Path
) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:SECRETHASH:19000:0:99999:7:::\n")
    with app_host(tmp_path / "A") as a:
        images = a.daemon.images.root
        os.mkfifo(images / "fifo")
        (images / "dir").mkdir()
        (images / "text").write_text("root:SECRETHASH:19000\n" * 10)
        (images / "shadowlink").symlink_to(secret)
        for name, status in (("fifo", 400), ("dir", 400), (str(secret), 403),
                             ("shadowlink", 403), ("missing", 404)):
            got, _, message = status_of(a, "/v1/restore", {"path": name})
            assert got == status, (name, message)
            assert "SECRET" not in message
        got, kind, message = status_of(a, "/v1/restore", {"path": "text"})
        assert (got, kind) == (400, "BadMagic") and "SECRET" not in message
        assert "root" not in message


def test_issue10_5_stream_file_is_checked_before_anything_and_confined(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    with app_host(tmp_path / "A") as a:
        make_vm(a)
        for target in (str(victim), "../victim", "no/dir/x.vmf"):
            status, _, _ = status_of(a, "/v1/vms/v/migrate", {
                "destination": "http://127.0.0.1:1", "params": {"stream_file": target}})
            assert status in (403, 404)
        assert victim.read_text() == "precious"
        assert list(a.daemon.images.root.iterdir()) == []


def test_images_dir_may_not_hold_the_daemons_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="own files"):
        ImagesDir(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="own files"):
        ImagesDir(tmp_path, tmp_path / "state")
    images = ImagesDir(tmp_path / "state" / "images", tmp_path / "state")
    out = images.create("a.vmf")
    out.file.write(b"x")
    assert not (images.root / "a.vmf").exists()  # not there before commit
    out.commit()
    assert (images.root / "a.vmf").read_bytes() == b"x"
    out = images.create("a.vmf")
    out.file.write(b"y")
    out.discard()
    assert (images.root / "a.vmf").read_bytes() == b"x"
    assert sorted(p.name for p in images.root.iterdir()) == ["a.vmf"]


def test_issue10_10_failed_save_undoes_itself(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with app_host(tmp_path / "A", "A", with_listener=True) as a, \
            app_host(tmp_path / "B", "B", with_listener=True) as b:
        make_vm(a, devices=[MLX5])
        real = SourceSession.next_buffers
        calls = {"n": 0}

        def failing(self: SourceSession) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:
                raise UnicodeEncodeError("utf-8", "x", 0, 1, "a node name that is not UTF-8")
            return real(self)

        monkeypatch.setattr(SourceSession, "next_buffers", failing)
        status, _, message = status_of(a, "/v1/vms/v/save", {"path": "v.vmf"})
        assert status == 400 and "runs on" in message
        monkeypatch.setattr(SourceSession, "next_buffers", real)
        hosted = a.daemon.get_vm("v")
        assert hosted.runstate == "running" and hosted.vm is not None and hosted.vm.running
        devices = a.client().get("/v1/vms/v")["report"]["vfio"]["devices"]
        assert {d["state"] for d in devices.values()} == {"RUNNING"}
        assert list(a.daemon.images.root.iterdir()) == []  # no partial file
        # the next save and the next migration work
        a.client().post("/v1/vms/v/save", {"path": "v.vmf"})
        job = a.client().post("/v1/vms/v/migrate", {"destination": b.url,
                                                    "params": {"verify": True}})
        from tests.unit.host.test_validation import wait_job

        done = wait_job(a, job["id"])
        assert done["status"] == "completed", done
        assert done["stats"]["verification"]["verified"]


def test_destroy_during_save_is_refused(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as a:
        make_vm(a)
        a.daemon.begin_save("v")
        status, _, _ = status_of(a, "/v1/vms/v/pause", {})
        assert status == 409
        with pytest.raises(ApiError) as err:
            a.client().delete("/v1/vms/v")
        assert err.value.status == 409
        a.daemon.end_save(a.daemon.get_vm("v"))
        assert a.client().get("/v1/vms/v")["runstate"] == "running"


def test_issue10_6_blocking_file_work_cannot_take_the_api(tmp_path: Path) -> None:
    """Saves and restores run on a small pool of their own; beyond its queue the answer
    is 503 at once, and the rest of the API answers meanwhile."""
    import asyncio
    import threading

    from vmferry.host.api import FileWork

    release = threading.Event()
    work = FileWork(workers=1, queue=1)

    async def scenario() -> list[object]:
        calls = [asyncio.ensure_future(work.run(release.wait)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as err:
            await work.run(release.wait)
        assert err.value.status == 503 and err.value.kind == "Busy"
        release.set()
        return list(await asyncio.gather(*calls))

    try:
        assert asyncio.run(scenario()) == [True, True]
    finally:
        work.close()
    with app_host(tmp_path / "A") as a:
        os.mkfifo(a.daemon.images.root / "fifo")
        for _ in range(8):  # FIFOs are refused without blocking a worker
            assert status_of(a, "/v1/restore", {"path": "fifo"})[0] == 400
        assert a.client().get("/v1/vms") == []
