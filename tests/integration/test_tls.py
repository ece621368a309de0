"""Mutual TLS between hosts (issue 14 item 3): a TLS cluster migrates; a plaintext peer
and a peer of another CA are refused with a clear error on both sides, and the source VM
keeps running.  Real host processes on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import wait_job
from vmferry.errors import ApiError, HostError
from vmferry.host.client import HostClient
from vmferry.host.processes import HostProcess, spawn_host
from vmferry.host.tls import TlsConfig, make_certs


@dataclass
class Cluster:
    root: Path
    a: HostProcess  # TLS, CA 1
    b: HostProcess  # TLS, CA 1
    c: HostProcess  # TLS, another CA
    p: HostProcess  # plaintext


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("tls")
    make_certs(root / "ca1", ["A", "B"])
    make_certs(root / "ca2", ["C"])
    hosts = [spawn_host("A", root / "A", tls_dir=root / "ca1" / "A"),
             spawn_host("B", root / "B", tls_dir=root / "ca1" / "B"),
             spawn_host("C", root / "C", tls_dir=root / "ca2" / "C"),
             spawn_host("P", root / "P")]  # fmt: skip
    try:
        yield Cluster(root, *hosts)
    finally:
        for h in hosts:
            h.stop()


def create(c: HostClient, name: str) -> None:
    c.post("/v1/vms", {"definition": {"name": name, "memory_mib": 16, "vcpus": 1,
                                      "fill": "random"}, "start": True})  # fmt: skip


def log_lines(h: HostProcess, word: str) -> list[str]:
    time.sleep(0.2)  # the daemon logs as it refuses; give it a moment
    return [line for line in (h.state_dir / "daemon.log").read_text().splitlines()
            if word in line]  # fmt: skip


def test_issue14_item3_a_tls_cluster_migrates(cluster: Cluster) -> None:
    assert cluster.a.control_url.startswith("https://")
    a = cluster.a.client()
    create(a, "t1")
    job = a.post("/v1/vms/t1/migrate", {"destination": cluster.b.control_url,
                                        "params": {"verify": True}})  # fmt: skip
    job = wait_job(a, job["id"])
    assert job["status"] == "completed", job
    assert job["stats"]["verification"]["verified"]
    assert cluster.b.client().get("/v1/vms/t1")["runstate"] == "running"


@pytest.mark.parametrize(("src", "dst", "words"), [
    ("a", "p", "refuses the plaintext destination"),
    ("p", "b", "serves TLS and this host has no certificate"),
    ("a", "c", "not signed by this cluster's CA"),
])  # fmt: skip
def test_issue14_item3_refused_peers_leave_the_source_running(
    cluster: Cluster, src: str, dst: str, words: str
) -> None:
    source, dest = getattr(cluster, src), getattr(cluster, dst)
    c = source.client()
    name = f"r-{src}{dst}"
    create(c, name)
    with pytest.raises(ApiError) as info:
        c.post(f"/v1/vms/{name}/migrate", {"destination": dest.control_url, "params": {}})
    assert info.value.status == 502 and words in info.value.message
    assert c.get(f"/v1/vms/{name}")["runstate"] == "running"
    assert name not in [v["name"] for v in dest.client().get("/v1/vms")]


def test_issue14_item3_clients_without_the_cluster_certificate_are_refused(
    cluster: Cluster,
) -> None:
    url, token = cluster.a.control_url, cluster.a.token
    with pytest.raises(HostError, match="not signed by this cluster's CA"):
        HostClient(url, token).get("/v1/vms")
    other = TlsConfig.load(cluster.root / "ca2" / "C").client_context()
    with pytest.raises(HostError, match="not signed by this cluster's CA"):
        HostClient(url, token, tls=other).get("/v1/vms")
    with pytest.raises(HostError, match="does it serve TLS"):
        HostClient(url.replace("https://", "http://"), token).get("/v1/vms")
    assert log_lines(cluster.a, "control API refused a connection: TLS: the client does "
                                "not speak TLS")  # fmt: skip


def test_issue14_item3_the_migration_listener_refuses_plaintext(cluster: Cluster) -> None:
    ready = (cluster.a.state_dir / "ready.json").read_text()
    import json

    host, port = json.loads(ready)["migration_address"]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"\x00\x01\x00\x00\x00\x00\x00\x10plaintext hello!")
        sock.settimeout(5)
        try:
            answer = sock.recv(64)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"\x00")  # no channel frame comes back, only TLS or EOF
    assert log_lines(cluster.a, "refused migration connection")
    assert any("plaintext peer" in line for line in log_lines(cluster.a, "refused migration"))
