from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmferry.host.auth import TOKEN_FILE_ENV, load_or_create_token
from vmferry.host.client import HostClient
from vmferry.host.processes import HostProcess, spawn_host

FINISHED = ("completed", "failed", "cancelled")


class Pair:
    def __init__(self, a: HostProcess, b: HostProcess) -> None:
        self.a_proc, self.b_proc = a, b
        self.a, self.b = a.client(), b.client()
        #: the images directory both hosts save to and restore from
        self.images = a.images_dir

    def create(self, name: str, **kw: Any) -> dict[str, Any]:
        definition = {"name": name, "memory_mib": 32, "vcpus": 2, "fill": "random", **kw}
        out: dict[str, Any] = self.a.post("/v1/vms", {"definition": definition, "start": True})
        return out

    def migrate(self, name: str, wait: bool = True, **params: Any) -> dict[str, Any]:
        job: dict[str, Any] = self.a.post(
            f"/v1/vms/{name}/migrate",
            {"destination": self.b_proc.control_url, "params": {"verify": True, **params}},
        )
        return wait_job(self.a, job["id"]) if wait else job


def wait_job(c: HostClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}")
        if job["status"] in FINISHED:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def wait_recovered(c: HostClient, timeout: float = 60) -> list[dict[str, Any]]:
    """The VMs of a restarted host once none is ``recovering`` any more (a restarted
    daemon answers at once and rebuilds its VMs in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        vms: list[dict[str, Any]] = c.get("/v1/vms")
        if all(v["runstate"] != "recovering" for v in vms) or time.monotonic() > deadline:
            return vms
        time.sleep(0.05)


def digest(c: HostClient, name: str) -> dict[str, str]:
    out: dict[str, str] = c.get(f"/v1/vms/{name}?digest=1")["digests"]
    return out


def vm_names(c: HostClient) -> list[str]:
    return [v["name"] for v in c.get("/v1/vms")]


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmferry", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


@pytest.fixture(scope="session", autouse=True)
def cluster_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One control-API token file for every host and CLI call of the session: hosts
    started by spawn_host and CLI subprocesses find it through VMFERRY_TOKEN_FILE."""
    path = tmp_path_factory.mktemp("cluster") / "token"
    load_or_create_token(path)
    old = os.environ.get(TOKEN_FILE_ENV)
    os.environ[TOKEN_FILE_ENV] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop(TOKEN_FILE_ENV, None)
        else:
            os.environ[TOKEN_FILE_ENV] = old


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("hosts")
    a = spawn_host("A", root / "A")
    b = spawn_host("B", root / "B")
    try:
        yield Pair(a, b)
    finally:
        a.stop()
        b.stop()
    assert a.proc.returncode is not None and b.proc.returncode is not None


@pytest.fixture
def fresh_pair(tmp_path: Path) -> Iterator[Pair]:
    a = spawn_host("A", tmp_path / "A")
    b = spawn_host("B", tmp_path / "B")
    try:
        yield Pair(a, b)
    finally:
        a.stop()
        b.stop()
