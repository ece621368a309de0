"""Every parameter is checked before anything happens, and a refusal is a typed 4xx
(issue 10, Why 4, 9, 11, 12, 13, 17), against real in-process daemons."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.unit.host.apphost import AppHost, app_host

from vmferry.errors import ApiError, ConfigError, MalformedRecord
from vmferry.host.clocks import MonotonicClock
from vmferry.host.transport import Channel, SocketLink
from vmferry.machine.vm import create_vm, load_definition
from vmferry.migration.channel import Connection, Error, Hello, Reject, Role, StreamEnd
from vmferry.migration.channel.frames import HEADER, MAGIC, VERSION, Command
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import MAJOR, MINOR

FINISHED = ("completed", "failed", "cancelled")


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[AppHost, AppHost]]:
    with app_host(tmp_path / "A", "A", with_listener=True) as a, \
            app_host(tmp_path / "B", "B", with_listener=True) as b:
        yield a, b


def wait_job(host: AppHost, job_id: str) -> dict[str, Any]:
    for _ in range(600):
        job: dict[str, Any] = host.client().get(f"/v1/jobs/{job_id}")
        if job["status"] in FINISHED:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def refused(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        call(*args)
    assert 400 <= err.value.status < 500, err.value
    assert err.value.message and err.value.kind
    return err.value


@pytest.mark.parametrize("params", [
    {"downtime_limit_ms": 0},
    {"downtime_limit_ms": -5},
    {"max_passes": 0},
    {"downtime_limit_ms": "fast"},
    {"max_bandwidth_mib": 0},
    {"verify": "yes"},
    {"compat": "libvirt"},
    {"stream_file": "no/such/dir/copy.vmf"},
    {"stream_file": "../outside.vmf"},
    {"unknown": 1},
])
def test_issue10_4_bad_migrate_parameter_leaves_nothing_behind(
    two: tuple[AppHost, AppHost], params: dict[str, Any]
) -> None:
    a, b = two
    ca = a.client()
    ca.post("/v1/vms", {"definition": {"name": "w", "memory_mib": 8}, "start": True})
    refused(ca.post, "/v1/vms/w/migrate", {"destination": b.url, "params": params})
    assert ca.get("/v1/vms/w")["runstate"] == "running"
    assert ca.get("/v1/jobs") == [] and b.client().get("/v1/jobs") == []
    assert b.daemon.incoming == {}
    assert sorted(p.name for p in a.daemon.images.root.iterdir()) == []
    # nothing is wedged: the VM pauses, runs and migrates
    ca.post("/v1/vms/w/pause")
    ca.post("/v1/vms/w/start")
    job = ca.post("/v1/vms/w/migrate", {"destination": b.url, "params": {"verify": True}})
    assert wait_job(a, job["id"])["status"] == "completed"
    assert b.client().get("/v1/vms/w")["runstate"] == "running"


def test_issue10_9_reservations_expire_on_a_timer(tmp_path: Path) -> None:
    with app_host(tmp_path / "B", "B") as b:
        b.daemon.reservation_ttl_s = 0.2
        c = b.client()
        inc = c.post("/v1/incoming", {"vm": "squat", "definition": {"name": "squat",
                                                                    "memory_mib": 4}})
        refused(c.post, "/v1/vms", {"definition": {"name": "squat", "memory_mib": 4}})
        for _ in range(200):  # the app's sweeper runs every second, without any hello
            if c.get(f"/v1/jobs/{inc['job']}")["status"] != "setup":
                break
            time.sleep(0.05)
        job = c.get(f"/v1/jobs/{inc['job']}")
        assert job["status"] == "failed" and "in time" in job["error"]
        assert b.daemon.incoming == {}
        c.post("/v1/vms", {"definition": {"name": "squat", "memory_mib": 4}})


def source_channel(address: Any) -> Channel:
    sock = socket.create_connection(tuple(address), 5)
    sock.settimeout(5)
    return Channel(SocketLink(sock), Connection(Role.SOURCE))


def test_issue10_11_destination_refuses_a_stream_whose_config_differs(
    two: tuple[AppHost, AppHost]
) -> None:
    _, b = two
    approved = {"name": "small", "memory_mib": 16, "vcpus": 2}
    inc = b.client().post("/v1/incoming", {"vm": "small", "definition": approved})
    big = create_vm({"name": "small", "memory_mib": 32, "vcpus": 8})
    ch = source_channel(inc["migration_address"])
    try:
        session = SourceSession(big, MigrationParams(offline=True), MonotonicClock())
        ch.send(Hello(inc["token"], (MAJOR, MINOR), "running", "A"))
        assert ch.next_event().__class__.__name__ == "Welcome"
        bufs = session.start()
        reply: object = None
        try:
            while bufs and reply is None:
                ch.send_stream(bufs)
                reply = ch.poll_event()
                bufs = session.next_buffers()
            if reply is None:
                ch.send(StreamEnd())
                reply = ch.next_event()
        except OSError:  # the destination stopped reading once it refused
            status = ch.peer_failure(5.0)
            reply = Error(status) if status is not None else None
    finally:
        big.close()
        ch.link.close()
    # the refusal arrives typed: the destination's ConfigError, at its step
    assert isinstance(reply, Error), reply
    assert reply.status.exception().__class__ is MalformedRecord  # as raised there
    assert "differs" in reply.status.message and reply.status.step.startswith("receiving")
    assert "small" not in [v["name"] for v in b.client().get("/v1/vms")]
    assert wait_job(b, inc["job"])["status"] == "failed"


def raw_hello(body: bytes, major: int = 1) -> bytes:
    import zlib

    payload = VERSION.pack(MAGIC, major, 0) + body
    return HEADER.pack(Command.HELLO, 0, len(payload), zlib.crc32(payload)) + payload


@pytest.mark.parametrize("version", [[], 5, None, "1.0", [True, 0], [MAJOR + 1, 0]])
def test_issue10_15_stream_version_gets_a_typed_refusal(two: tuple[AppHost, AppHost],
                                                        version: Any) -> None:
    import json

    _, b = two
    inc = b.client().post("/v1/incoming", {"vm": "v", "definition": {"name": "v"}})
    ch = source_channel(inc["migration_address"])
    try:
        body = json.dumps({"token": inc["token"], "stream_version": version,
                           "runstate": "running", "source": "A"}).encode()
        ch.conn.send(Hello(inc["token"], (MAJOR, MINOR), "running", "A"))  # not sent:
        ch.link.send([raw_hello(body)])  # these bytes go instead
        reply = ch.next_event()
    finally:
        ch.link.close()
    assert isinstance(reply, Reject), reply
    assert reply.status.step == "handshake" and "version" in reply.status.message
    refusals = [e for e in b.daemon.store.events() if e["kind"] == "refused"]
    assert refusals and "version" in refusals[0]["message"]


def test_issue14_1_channel_version_mismatch_gets_a_typed_refusal(
    two: tuple[AppHost, AppHost]
) -> None:
    """A source of another channel major version is refused at the handshake with a
    REJECT it can read, naming both versions."""
    _, b = two
    inc = b.client().post("/v1/incoming", {"vm": "v", "definition": {"name": "v"}})
    ch = source_channel(inc["migration_address"])
    try:
        ch.send(Hello(inc["token"], (MAJOR, MINOR), "running", "A", major=9, minor=1))
        reply = ch.next_event()
    finally:
        ch.link.close()
    assert isinstance(reply, Reject), reply
    from vmferry.migration.channel import MINOR as CHANNEL_MINOR

    speaks = f"channel protocol 9.1 is not supported (this host speaks 1.{CHANNEL_MINOR})"
    assert speaks in reply.status.message
    assert reply.status.exception().__class__.__name__ == "MigrationRefused"


@pytest.mark.parametrize("definition", [
    {"name": "nan", "workload": {"dirty_rate_mbps": float("nan")}},
    {"name": "inf", "workload": {"dirty_rate_mbps": float("inf")}},
    {"name": "big", "workload": {"dirty_rate_mbps": 1e308}},
])
def test_issue10_12_non_finite_rates_refused(tmp_path: Path, definition: dict[str, Any]) -> None:
    import json

    with app_host(tmp_path / "A") as a:
        body = json.dumps({"definition": definition, "start": True}).encode()
        import urllib.request

        req = urllib.request.Request(f"{a.url}/v1/vms", body, method="POST", headers={
            "Authorization": f"Bearer {a.client().token}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 400
        assert json.loads(err.value.read())["error"]["kind"] in ("BadJson", "InvalidRequest")
        assert a.client().get("/v1/vms") == []


@pytest.mark.parametrize(("body", "status"), [
    ({"definition": {"name": "m", "memory_mib": 10**12}}, 400),
    ({"definition": {"name": "m", "seed": -1}}, 400),
    ({"definition": {"name": "m", "devices": [{"id": "d", "driver": "mlx5",
                                               "state_mib": 10**9}]}}, 400),
    ({"definition": {"name": "m", "devices": [{"id": "x" * 300, "driver": "mlx5"}]}}, 400),
    ({"definition": {"name": "abc\n"}}, 400),
    ({"definition": {"name": "m"}, "start": "false"}, 400),
    ({"definition": {"name": "m"}, "start": 0}, 400),
    ({"definition": {"name": "m", "memory_mib": 16.0}}, 400),
    ({"definition": {"name": "m", "nonsense": 1}}, 400),
    ({"definition": {"name": "m", "arch": "pseries", "memory_mib": 64,
                     "tce_windows": [{"liobn": 0x80000000, "offset": 0,
                                      "size_mib": 10**8, "page_shift": 12}]}}, 422),
])
def test_issue10_13_untyped_inputs_get_typed_4xx(tmp_path: Path, body: dict[str, Any],
                                                 status: int) -> None:
    with app_host(tmp_path / "A") as a:
        err = refused(a.client().post, "/v1/vms", body)
        assert err.status == status, err
        assert a.client().get("/v1/vms") == []


def test_issue10_17_names_are_anchored_everywhere() -> None:
    with pytest.raises(ConfigError):
        load_definition({"name": "abc\n"})
    load_definition({"name": "abc"})


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/vms/x/save", {"path": ""}),
    ("/v1/vms/x/save", {"path": "a\0b"}),
    ("/v1/vms/x/save", {"path": 5}),
    ("/v1/restore", {"path": "x", "start": "true"}),
    ("/v1/vms/x/migrate", {"destination": "data:,x"}),
    ("/v1/vms/x/migrate", {"destination": "http://127.0.0.1:1", "params": []}),
    ("/v1/incoming", {"vm": "a", "definition": {"name": "b"}}),
    ("/v1/incoming", {"vm": "a\n", "definition": {"name": "a\n"}}),
    ("/v1/vms", [1, 2]),
])
def test_issue10_13_every_endpoint_refuses_bad_bodies(tmp_path: Path, path: str,
                                                      body: Any) -> None:
    with app_host(tmp_path / "A") as a:
        c = a.client()
        c.post("/v1/vms", {"definition": {"name": "x", "memory_mib": 4}})
        err = refused(c.post, path, body)
        assert err.status in (400, 403, 404), err
        assert a.daemon.incoming == {} and c.get("/v1/jobs") == []


def test_issue10_13_deep_json_is_refused(tmp_path: Path) -> None:
    import urllib.request

    with app_host(tmp_path / "A") as a:
        deep = b"[" * 100_000 + b"]" * 100_000
        req = urllib.request.Request(f"{a.url}/v1/vms", deep, method="POST", headers={
            "Authorization": f"Bearer {a.client().token}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 400


def test_issue13_4_vm_too_large_for_the_host_is_named(tmp_path: Path) -> None:
    with app_host(tmp_path / "A", "A") as a:
        err = refused(a.client().post, "/v1/vms", {"definition": {"name": "huge",
                                                                  "memory_mib": 10**7}})
        assert err.status == 422 and err.kind == "VmTooLarge"
        assert "too large for host A" in err.message and "MiB available" in err.message
        err = refused(a.client().post, "/v1/incoming",
                      {"vm": "huge", "definition": {"name": "huge", "memory_mib": 10**7}})
        assert err.kind == "VmTooLarge" and a.daemon.incoming == {}


def test_openapi_document_has_real_schemas(tmp_path: Path) -> None:
    with app_host(tmp_path / "A") as a:
        doc = a.client().get("/v1/openapi.json")
    schemas = doc["components"]["schemas"]
    assert {"VmDefinitionModel", "MigrateRequest", "MigrationParamsModel", "ErrorBody",
            "JobInfo"} <= set(schemas)
    params = schemas["MigrationParamsModel"]
    assert params["additionalProperties"] is False
    assert params["properties"]["downtime_limit_ms"]["exclusiveMinimum"] == 0
    migrate = doc["paths"]["/v1/vms/{name}/migrate"]["post"]
    assert migrate["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/MigrateRequest")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
