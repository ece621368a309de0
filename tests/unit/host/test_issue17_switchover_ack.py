"""Issue 17, item 3: switchover-ack between the host daemon's real migration workers over
in-memory pipes: the source stops its guest only after the destination's SWITCHOVER_ACK;
a destination that cannot load the initial bytes fails the migration with its typed error
while the guest keeps running; a cut while the source waits for the ack fails cleanly;
a peer of channel 1.1 still migrates (no ack expected, none sent)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from tests.unit.host.test_channel_workers import _accept, hosts  # noqa: F401 (fixture)

from vmferry.host.daemon import HostDaemon
from vmferry.host.migration import ack as ack_mod
from vmferry.host.migration import destination as destination_mod
from vmferry.host.migration import source as source_mod
from vmferry.host.migration.source import SourceWorker
from vmferry.hw.vfio import VfioError
from vmferry.hw.vfio.vmm import VmmDevice
from vmferry.migration.channel import Command
from vmferry.migration.channel.frames import HEADER
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.testing.pipes import Faults, PipeLink, link_pair

DEF = {"name": "g", "memory_mib": 8, "vcpus": 1,
       "devices": [{"id": "nic0", "driver": "mlx5", "state_mib": 1,
                    "dma_region": [0x100000, 0x10000], "seed": 7}]}  # fmt: skip


def migrate(a: HostDaemon, b: HostDaemon, *, b_to_a: Faults | None = None
            ) -> tuple[Any, Any, PipeLink]:  # fmt: skip
    if "g" not in a.vms:
        a.create(dict(DEF), start=True)
    hosted = a.vms["g"]
    inc, caps = b.expect_incoming("g", dict(DEF), True, "pipe")
    job = a.new_job("g", "source", "http://127.0.0.1:9", {"verify": True})
    hosted.move("migrating")
    hosted.job = job.id
    job.progress["peer_job"] = inc.job_id
    to_dest, to_source = link_pair(None, b_to_a)
    incoming = {"token": inc.token, "migration_address": ["pipe", 0], "capabilities": caps,
                "job": inc.job_id}
    worker = SourceWorker(a, hosted, job, MigrationParams(verify=True), None, incoming,
                          "running", dialer=lambda addr, t: to_dest)  # fmt: skip
    dst = threading.Thread(target=_accept, args=(b, to_source), daemon=True)
    dst.start()
    worker.run()
    to_dest.close()
    dst.join(30)
    assert not dst.is_alive()
    return job, b.jobs[inc.job_id], to_source


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each time a source session stops its guest: whether the ack had arrived."""
    seen: list[bool] = []
    real = SourceSession._pause_guest

    def pause(self: SourceSession) -> None:
        seen.append(self.ack.ack is not None)
        real(self)

    monkeypatch.setattr(SourceSession, "_pause_guest", pause)
    return seen


def _commands(link: PipeLink) -> list[Command]:
    """The frames one direction of a pipe carried, in order."""
    data = bytes(link.end.out._data)
    out, at = [], 0
    while at + HEADER.size <= len(data):
        cmd, _, length, _ = HEADER.unpack_from(data, at)
        out.append(Command(cmd))
        at += HEADER.size + length
    return out


def test_issue17_3_source_stops_only_after_the_ack(hosts: tuple[HostDaemon, HostDaemon],  # noqa: F811
                                                   pauses: list[bool]) -> None:  # fmt: skip
    a, b = hosts
    src, dst, to_source = migrate(a, b)
    assert src.status == "completed", src.error
    assert dst.status == "completed"
    assert pauses == [True]  # one stop, after the ack
    ack = src.stats["switchover-ack"]
    assert ack["device_bytes"] >= 1 << 20 and ack["load_ms"] >= 0
    assert "device_load_ms" in src.stats["predicted-downtime-breakdown"]
    assert src.stats["verification"]["verified"]
    frames = _commands(to_source)
    assert frames[:2] == [Command.WELCOME, Command.SWITCHOVER_ACK]
    assert frames.count(Command.SWITCHOVER_ACK) == 1


def test_issue17_3_destination_that_cannot_load_initial_bytes_fails_typed(
    hosts: tuple[HostDaemon, HostDaemon], pauses: list[bool],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self: VmmDevice, chunk: Any) -> None:
        raise VfioError(22, "LOAD: image does not apply")

    monkeypatch.setattr(VmmDevice, "load_data", refuse)  # only the destination loads
    a, b = hosts
    src, dst, _ = migrate(a, b)
    assert src.status == "failed" and dst.status == "failed"
    assert src.stats["destination_error"]["kind"] == "DeviceLoadError"
    assert "DeviceLoadError" in src.error and "rejected state chunk" in src.error
    assert pauses == []  # the guest never stopped
    assert a.vms["g"].runstate == "running" and "g" not in b.vms


def test_issue17_3_cut_while_waiting_for_the_ack(
    hosts: tuple[HostDaemon, HostDaemon], pauses: list[bool],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The destination's direction breaks right after WELCOME: the ack never comes.  The
    source fails (while it waits, or as soon as it sees the break), its guest never
    stopped."""
    a, b = hosts
    clean_src, _, to_source = migrate(a, b)
    assert clean_src.status == "completed"
    back_src, _, _ = migrate(b, a)  # bring it home for the cut run
    assert back_src.status == "completed"
    a.undefine("g")
    cut = to_source.sizes[0]  # the end of WELCOME: SWITCHOVER_ACK is the next frame
    pauses.clear()
    src, dst, _ = migrate(a, b, b_to_a=Faults(cut_at=cut))
    assert src.status == "failed" and dst.status == "failed"
    assert pauses == []
    assert a.vms["g"].runstate == "running" and b.vms["g"].runstate != "running"
    # Where the source notices depends on timing: while it waits for the ack, or earlier,
    # when its pass-1 writes meet the closed connection.  Either way it names the cause.
    assert ("awaiting switchover ack" in src.step or "switchover" in src.error
            or "destination broke the channel" in src.error), (src.step, src.error)


@pytest.mark.parametrize("old", ["destination", "source"])
def test_issue17_3_a_channel_1_1_peer_still_migrates(
    hosts: tuple[HostDaemon, HostDaemon], pauses: list[bool],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch, old: str,
) -> None:
    """A peer from before switchover-ack (channel 1.1): no marker, no SWITCHOVER_ACK, the
    source stops when pre-copy converges, and the migration completes."""
    mod = destination_mod if old == "destination" else ack_mod
    monkeypatch.setattr(mod, "SWITCHOVER_ACK_MINOR", 99)  # it does not speak it
    if old == "destination":
        real = destination_mod.Welcome
        monkeypatch.setattr(destination_mod, "Welcome",
                            lambda host: real(host, minor=1))  # fmt: skip
    else:
        real_hello = source_mod.Hello
        monkeypatch.setattr(source_mod, "Hello",
                            lambda *a, **k: real_hello(*a, **k, minor=1))  # fmt: skip
    a, b = hosts
    src, _, to_source = migrate(a, b)
    assert src.status == "completed", src.error
    assert pauses == [False]
    assert "switchover-ack" not in src.stats
    assert Command.SWITCHOVER_ACK not in _commands(to_source)
    assert src.stats["verification"]["verified"]


def test_issue17_3_channel_version_is_1_2(tmp_path: Path) -> None:
    from vmferry.migration.channel import MINOR
    from vmferry.migration.channel.frames import SWITCHOVER_ACK_MINOR

    # switchover-ack came with 1.2; 1.3 (LIVE records on the data channels) keeps it
    assert SWITCHOVER_ACK_MINOR == 2 and MINOR >= SWITCHOVER_ACK_MINOR
