"""Issue 10 (engine part) inside one daemon object: the atomic check-and-mark, restart
recovery from persisted job state, and cancel after COMMIT."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmferry.errors import ApiError
from vmferry.host import daemon as daemon_mod
from vmferry.host import migration as hostmig
from vmferry.host.daemon import HostDaemon
from vmferry.host.store import JobRow, Store

DEF = {"name": "g", "memory_mib": 4, "vcpus": 1}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[HostDaemon]:
    d = HostDaemon("T", tmp_path / "T")
    d.recover()
    try:
        yield d
    finally:
        d.shutdown()


def _restart(tmp_path: Path, runstate: str, progress: dict[str, Any]) -> HostDaemon:
    store = Store(tmp_path / "R" / "host.sqlite3") if (tmp_path / "R").exists() else None
    if store is None:
        (tmp_path / "R").mkdir()
        store = Store(tmp_path / "R" / "host.sqlite3")
    store.put_vm("g", DEF, runstate)
    store.put_job(JobRow("j1", "g", "source", "http://127.0.0.1:9", "device", {}, {}, "",
                         "commit" if progress.get("commit_sent") else "ram pass 2",
                         1.0, 1.0, progress))
    store.close()
    d = HostDaemon("R", tmp_path / "R")
    d.recover()
    return d


def test_issue10_3_second_migrate_gets_409_naming_the_job(
    daemon: HostDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests at once: the check and the mark are one step, so the second one
    sees the first one's job (it used to pass the check while the first was still asking
    the destination)."""
    daemon.create(dict(DEF), start=True)
    asked = threading.Event()
    release = threading.Event()

    def slow_destination(url: str, body: dict[str, Any], *more: object) -> dict[str, Any]:
        asked.set()
        release.wait(10)
        raise ApiError(503, "destination busy")

    monkeypatch.setattr(hostmig.source, "ask_destination", slow_destination)
    first: list[BaseException] = []

    def go() -> None:
        try:
            daemon.migrate("g", "http://127.0.0.1:9", {})
        except BaseException as exc:
            first.append(exc)

    t = threading.Thread(target=go)
    t.start()
    assert asked.wait(10)
    with pytest.raises(ApiError) as err:
        daemon.migrate("g", "http://127.0.0.1:9", {})
    job_id = daemon.vms["g"].job
    assert err.value.status == 409 and job_id is not None and job_id in str(err.value)
    release.set()
    t.join()
    # the first request failed before anything moved: the VM is given back as it was
    assert isinstance(first[0], ApiError)
    assert daemon.vms["g"].runstate == "running" and daemon.vms["g"].job is None
    assert job_id not in daemon.jobs and daemon.store.jobs(job_id) == []  # nothing left
    assert daemon.store.vms()[0][2] == "running"


def test_issue10_3_restart_before_commit_does_not_boot_a_running_copy(tmp_path: Path) -> None:
    d = _restart(tmp_path, "migrating", {"peer_job": "p1"})
    try:
        g = d.vms["g"]
        assert g.runstate == "paused" and g.memory_lost and "before COMMIT" in g.note
        assert d.get_job("j1").status == "failed"
    finally:
        d.shutdown()


@pytest.mark.parametrize(
    ("outcome", "runstate"),
    [("resumed", "migrated"), ("not-resumed", "paused"), ("no answer", "needs-attention")],
)
def test_issue10_3_restart_after_commit_asks_the_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str, runstate: str
) -> None:
    asked: list[tuple[str, object, str]] = []

    def ask(peer: str, peer_job: object, vm: str, token: str | None = None,
            **kw: object) -> str:
        asked.append((peer, peer_job, vm))
        return outcome

    monkeypatch.setattr(daemon_mod, "ask_destination_outcome", ask)
    d = _restart(tmp_path, "migrating", {"peer_job": "p1", "commit_sent": True})
    try:
        g = d.vms["g"]
        assert asked == [("http://127.0.0.1:9", "p1", "g")]
        assert g.runstate == runstate
        if runstate == "needs-attention":
            assert g.vm is None  # never booted from its definition
            assert "vm destroy" in g.note and "vm start" in g.note
            assert g.to_json()["runstate"] == "needs-attention" and g.to_json()["note"]
            d.set_running("g", True)  # the operator's word: it runs nowhere else
            assert d.vms["g"].runstate == "running" and d.vms["g"].memory_lost
        elif runstate == "migrated":
            assert g.vm is None and d.get_job("j1").status == "completed"
    finally:
        d.shutdown()


def test_issue10_3_migrated_husk_is_never_booted(tmp_path: Path) -> None:
    d = _restart(tmp_path, "migrated", {"peer_job": "p1", "commit_sent": True})
    try:
        assert d.vms["g"].runstate == "migrated" and d.vms["g"].vm is None
    finally:
        d.shutdown()


def test_issue10_5_cancel_after_commit_says_why(daemon: HostDaemon) -> None:
    job = daemon.new_job("g", "source", "http://127.0.0.1:9", {})
    job.move("device")
    job.progress["commit_sent"] = True
    with pytest.raises(ApiError) as err:
        daemon.cancel(job.id)
    assert err.value.status == 409 and "past COMMIT" in str(err.value)
    assert not job.cancel.is_set()


def test_job_progress_is_persisted(daemon: HostDaemon) -> None:
    job = daemon.new_job("g", "source", "http://127.0.0.1:9", {})
    job.progress.update(peer_job="p9", commit_sent=True)
    daemon.save_job(job)
    row = daemon.store.jobs(job.id)[0]
    assert row.progress == {"peer_job": "p9", "commit_sent": True}
