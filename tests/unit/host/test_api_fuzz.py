"""Arbitrary JSON at every endpoint of a real in-process daemon finds no 500 and no dead
guest thread (issue 10, Why 12 and 13)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.host.apphost import TOKEN, app_host

from vmferry.errors import ApiError
from vmferry.host import migration, resources

ENDPOINTS = [
    ("POST", "/v1/vms"),
    ("POST", "/v1/vms/{vm}/start"),
    ("POST", "/v1/vms/{vm}/pause"),
    ("POST", "/v1/vms/{vm}/save"),
    ("POST", "/v1/vms/{vm}/migrate"),
    ("POST", "/v1/restore"),
    ("POST", "/v1/incoming"),
    ("POST", "/v1/jobs/{vm}/cancel"),
    ("GET", "/v1/vms/{vm}"),
    ("GET", "/v1/vms/{vm}/dtb"),
    ("GET", "/v1/jobs/{vm}"),
    ("DELETE", "/v1/vms/{vm}"),
]
KEYS = ["definition", "start", "path", "destination", "params", "vm", "verify", "peer",
        "name", "arch", "memory_mib", "vcpus", "workload", "fill", "seed", "devices",
        "tce_windows", "dma_devices", "dirty_rate_mbps", "downtime_limit_ms", "max_passes",
        "stream_file", "id", "driver", "state_mib", "size_mib", "page_shift", "liobn"]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from(["", "x", "abc\n", "pseries", "arm64", "mlx5", "random", "../x",
                              "http://127.0.0.1:1", "data:,x", "\0", "ü" * 3, "a" * 300]))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=6),
    max_leaves=20,
)
bodies = st.dictionaries(st.sampled_from(KEYS), values, max_size=6) | values
names = st.sampled_from(["fz", "ghost", "a%0Ab", "%2e%2e", "x" * 100])


def send(url: str, method: str, path: str, body: Any) -> int:
    data = json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data if method != "GET" else None,
                                 method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        out = json.loads(exc.read())
        assert set(out["error"]) == {"kind", "message", "step"}, out
        return int(exc.code)


def test_issue10_13_fuzzed_requests_never_500(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # keep every VM small and every peer unreachable: the fuzzer must not allocate or dial
    monkeypatch.setattr(resources, "memory_available_mib", lambda: 64)

    def no_peer(*args: Any) -> Any:
        raise ApiError(502, "no peers in this test", "PeerUnreachable", "setup")

    monkeypatch.setattr(migration.source, "ask_destination", no_peer)
    with app_host(tmp_path / "A") as host:
        host.client().post("/v1/vms", {"definition": {"name": "fz", "memory_mib": 8,
                                                      "workload": {"dirty_rate_mbps": 5}},
                                       "start": True})
        runner = host.daemon.get_vm("fz").runner
        assert runner is not None

        @settings(max_examples=100, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(endpoint=st.sampled_from(ENDPOINTS), vm=names, body=bodies)
        def one(endpoint: tuple[str, str], vm: str, body: Any) -> None:
            method, path = endpoint
            if vm == "fz" and method == "DELETE":
                return
            status = send(host.url, method, path.format(vm=vm), body)
            assert status < 500 or status in (502, 503), (endpoint, vm, body, status)

        one()
        fz = host.daemon.get_vm("fz")
        assert fz.runner is runner and runner._thread.is_alive()
        assert host.client().get("/v1/vms/fz")["runstate"] in ("running", "paused")
        for hosted in host.daemon.vms.values():
            assert hosted.runner is None or hosted.runner._thread.is_alive(), hosted.name
