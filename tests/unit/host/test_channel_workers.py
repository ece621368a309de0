"""The host daemon's real migration workers (SourceWorker, DestinationWorker) driven over
in-memory pipes instead of sockets (issue 14, item 1): the channel between them cut or
stalled at every frame boundary, and in the middle of frames.

Two in-process daemons, no control API and no listener: the destination's first frame
is read the way the listener's gate reads it (``transport.first_event``), and the
source's question after a silent COMMIT ("did you resume it?") is answered from the
destination daemon's persisted job, as its control API would.

The invariant after every run: the guest runs on exactly one host -- the source's copy
running and the destination holding nothing, or the source's copy ``migrated`` and the
destination running it -- never on both and never on neither, and both jobs ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmferry.host.daemon import HostDaemon, Job
from vmferry.host.faults import Fault
from vmferry.host.migration import source as source_mod
from vmferry.host.migration.destination import DestinationWorker
from vmferry.host.migration.source import SourceWorker
from vmferry.host.transport import Channel, first_event
from vmferry.migration.channel import Abort, Connection, Hello, Role
from vmferry.migration.source import MigrationParams
from vmferry.testing.pipes import Faults, PipeLink, link_pair

DEF = {"name": "g", "memory_mib": 4, "vcpus": 1}
FINISHED = ("completed", "failed", "cancelled")


@dataclass
class Run:
    source_job: Job
    dest_job: Job
    a: HostDaemon
    b: HostDaemon
    to_dest: PipeLink
    to_source: PipeLink

    @property
    def where(self) -> str:
        """Where the guest runs: "source", "destination", "both", "none" or
        "in-doubt" (paused on the source, needs-attention)."""
        src = self.a.vms["g"].runstate
        dst = self.b.vms.get("g")
        on_dst = dst is not None and dst.runstate == "running"
        if src == "needs-attention":
            return "in-doubt"
        if src == "running":
            return "both" if on_dst else "source"
        return "destination" if on_dst else "none"


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HostDaemon,
                                                                            HostDaemon]]:
    a, b = HostDaemon("A", tmp_path / "A"), HostDaemon("B", tmp_path / "B")
    a.recover()
    b.recover()

    def outcome(peer: str, peer_job: object, vm: str, *args: Any, **kw: Any) -> str:
        """The destination's control API, without HTTP: its persisted job."""
        job = b.jobs.get(str(peer_job))
        deadline = time.monotonic() + 5
        while job is not None and job.status not in FINISHED and time.monotonic() < deadline:
            time.sleep(0.01)
        if job is None or job.status not in FINISHED:
            return "no answer"
        return "resumed" if job.status == "completed" else "not-resumed"

    monkeypatch.setattr(source_mod, "ask_destination_outcome", outcome)
    try:
        yield a, b
    finally:
        a.shutdown()
        b.shutdown()


def _accept(b: HostDaemon, link: PipeLink) -> None:
    """The listener's part: read the first frame as the gate does, run the worker."""
    conn = Connection(Role.DESTINATION)
    buf = memoryview(bytearray(1 << 16))
    first: Hello | Abort | str | None = None
    while first is None:
        try:
            n = link.recv_into(buf)
        except TimeoutError:
            return
        conn.receive_data(buf[:n])
        if n == 0:
            return
        first = first_event(conn)
    if isinstance(first, str):
        link.close()
        return
    DestinationWorker(b, Channel(link, conn), ("pipe", 0), first).run()


def migrate(a: HostDaemon, b: HostDaemon, *, a_to_b: Faults | None = None,
            b_to_a: Faults | None = None, time_scale: float = 1.0, fault: str | None = None,
            params: dict[str, Any] | None = None, started: threading.Event | None = None,
            cancel_at: int | None = None) -> Run:
    """One migration of VM ``g`` from ``a`` to ``b`` over a pipe pair."""
    if "g" not in a.vms:
        a.create(dict(DEF), start=True)
    hosted = a.vms["g"]
    raw = dict(params or {})
    inc, caps = b.expect_incoming("g", dict(DEF), bool(raw.get("verify", False)), "pipe")
    job = a.new_job("g", "source", "http://127.0.0.1:9", raw)
    hosted.move("migrating")
    hosted.job = job.id
    job.progress["peer_job"] = inc.job_id
    to_dest, to_source = link_pair(a_to_b, b_to_a, time_scale)
    dials = iter([to_dest])

    def dialer(address: tuple[str, int], timeout: float) -> PipeLink:
        return next(dials)  # a second dial (pre-flight ABORT) finds no listener

    incoming = {"token": inc.token, "migration_address": ["pipe", 0], "capabilities": caps,
                "job": inc.job_id}
    worker = SourceWorker(a, hosted, job, MigrationParams(**raw),
                          Fault.parse(fault) if fault else None, incoming, "running",
                          dialer=dialer)  # fmt: skip
    if cancel_at is not None:
        real = worker._send_stream  # cancel once this many bytes went out

        def send_stream(ch: Channel) -> None:
            orig = ch.send_stream

            def counted(bufs: Any, on_stall: Any = None) -> None:
                if sum(to_dest.sizes) >= cancel_at:
                    job.cancel.set()
                orig(bufs, on_stall)

            ch.send_stream = counted  # type: ignore[method-assign]
            real(ch)

        worker._send_stream = send_stream  # type: ignore[method-assign]
    dst = threading.Thread(target=_accept, args=(b, to_source), daemon=True)
    dst.start()
    worker.run()
    to_dest.close()
    dst.join(30)
    assert not dst.is_alive(), "the destination worker never finished"
    return Run(job, b.jobs[inc.job_id], a, b, to_dest, to_source)


def clean_boundaries(tmp_path: Path) -> tuple[list[int], list[int]]:
    """Frame boundaries of each direction in a clean migration (same VM, same params)."""
    a, b = HostDaemon("A0", tmp_path / "A0"), HostDaemon("B0", tmp_path / "B0")
    a.recover()
    b.recover()
    try:
        run = migrate(a, b)
        assert run.source_job.status == "completed", run.source_job.error
        out = []
        for link in (run.to_dest, run.to_source):
            total, marks = 0, []
            for n in link.sizes:
                total += n
                marks.append(total)
            out.append(marks)
        return out[0], out[1]
    finally:
        a.shutdown()
        b.shutdown()


def check_one_host(run: Run) -> None:
    if run.dest_job.status == "setup":  # no HELLO arrived: the reservation runs out
        for inc in run.b.incoming.values():
            inc.expires = 0.0
        assert run.b.expire_reservations() == 1
    assert run.source_job.status in FINISHED, run.source_job
    assert run.dest_job.status in FINISHED, run.dest_job
    assert run.where in ("source", "destination"), (run.where, run.source_job.error,
                                                     run.dest_job.error)
    if run.where == "destination":
        assert run.source_job.status == "completed" and run.dest_job.status == "completed"
    else:
        assert run.source_job.status in ("failed", "cancelled")
        assert run.dest_job.status == "failed" and "g" not in run.b.vms


def test_source_writes_only_the_commit_step_with_the_guest_paused(
        hosts: tuple[HostDaemon, HostDaemon], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each job write is a synchronous commit: with the guest paused the source writes
    what recovery depends on (COMMIT with commit_sent, the final status) and publishes
    its transfer steps without writing them."""
    a, b = hosts
    writes: list[tuple[str, str, bool, bool]] = []
    real = a.store.put_job

    def put_job(row: Any) -> None:
        vm = a.vms["g"].vm
        paused = vm is not None and not vm.running
        writes.append((row.status, row.step, paused, bool(row.progress.get("commit_sent"))))
        real(row)

    monkeypatch.setattr(a.store, "put_job", put_job)
    published: list[str] = []
    real_publish = a.publish_job
    monkeypatch.setattr(a, "publish_job", lambda job: (published.append(job.step),
                                                       real_publish(job)))
    run = migrate(a, b)
    assert run.source_job.status == "completed", run.source_job.error
    while_paused = [w for w in writes if w[0] in ("active", "device") and w[2]]
    assert [(st, step) for st, step, _, sent in while_paused if not sent] == []
    assert ("device", "commit", True, True) in writes  # written before COMMIT goes out
    assert writes[-1][0] == "completed"
    assert any(step.startswith("ram pass") for step in published)


def test_issue14_1_clean_migration_over_pipes(hosts: tuple[HostDaemon, HostDaemon]) -> None:
    a, b = hosts
    run = migrate(a, b, params={"verify": True})
    assert run.source_job.status == "completed", run.source_job.error
    assert run.source_job.stats["verification"]["verified"]
    assert run.where == "destination" and run.dest_job.step == "resumed"


@pytest.mark.parametrize("direction", ["to_dest", "to_source"])
def test_issue14_1_cut_at_every_frame_boundary(tmp_path: Path, hosts: tuple[HostDaemon,
                                                                            HostDaemon],
                                               direction: str) -> None:
    """The connection breaks at each frame boundary of one direction, and in the middle
    of each control frame: the guest always ends on exactly one host."""
    to_dest, to_source = clean_boundaries(tmp_path)
    marks = to_dest if direction == "to_dest" else to_source
    cuts = sorted({0, *marks[:-1], *(m - 3 for m in marks if m > 3)})
    seen = set()
    for cut in cuts:
        a, b = hosts
        faults = Faults(cut_at=cut)
        run = (migrate(a, b, a_to_b=faults) if direction == "to_dest"
               else migrate(a, b, b_to_a=faults))  # fmt: skip
        check_one_host(run)
        seen.add(run.where)
        if run.where == "destination":  # bring the guest back for the next cut
            back = migrate(b, a)
            assert back.where == "destination", back.source_job.error
            a.undefine("g")
    # the cuts reach both outcomes: before COMMIT the source keeps it, after it moves
    assert seen == {"source", "destination"} or direction == "to_dest", seen


def test_issue14_1_destination_error_arrives_typed(hosts: tuple[HostDaemon,
                                                                HostDaemon]) -> None:
    """A stream the destination refuses (a corrupted record) fails the source with the
    destination's own error class, step and message."""
    a, b = hosts
    run = migrate(a, b, fault="active:corrupt", params={"max_bandwidth_mib": 64})
    check_one_host(run)
    err = run.source_job.stats["destination_error"]
    assert err["kind"] == "ChecksumMismatch" and err["step"].startswith("receiving stream")
    assert "ChecksumMismatch" in run.source_job.error
    assert "receiving stream" in run.source_job.error


def test_issue14_1_damaged_commit_is_a_definite_no(hosts: tuple[HostDaemon,
                                                                HostDaemon]) -> None:
    a, b = hosts
    run = migrate(a, b, fault="commit:corrupt")
    check_one_host(run)
    assert run.where == "source" and "never resumed" in run.source_job.error
    assert "CRC" in run.dest_job.error


def test_issue14_1_stalled_destination_is_bounded(hosts: tuple[HostDaemon,
                                                               HostDaemon]) -> None:
    """Nothing reaches the destination after its HELLO: the source gives up within its
    bound (time runs 50x fast on these pipes) and keeps its guest."""
    a, b = hosts
    hello_end = 400  # inside the first DATA frame: the HELLO is well below this
    run = migrate(a, b, a_to_b=Faults(stall_at=hello_end), time_scale=50.0,
                  params={"offline": True})
    check_one_host(run)
    assert "no progress" in run.source_job.error, run.source_job.error
    assert "sent nothing" in run.dest_job.error, run.dest_job.error


def test_issue14_1_cancel_before_commit_aborts_the_destination(
    hosts: tuple[HostDaemon, HostDaemon]
) -> None:
    a, b = hosts
    run = migrate(a, b, cancel_at=1, params={"max_bandwidth_mib": 64})
    check_one_host(run)
    assert run.source_job.status == "cancelled"
    assert "source aborted: cancelled by the operator" in run.dest_job.error


def test_destination_that_cannot_record_the_vm_does_not_run_it(
        hosts: tuple[HostDaemon, HostDaemon], monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash point after COMMIT: the destination resumed the guest, then failed to
    persist its VM record (disk full) and answered ERROR, so the source resumed too and
    the guest ran on both hosts.  The record is written before the guest is taken in."""
    a, b = hosts
    real = b.store.put_vm

    def full_disk(name: str, *args: Any, **kw: Any) -> None:
        if name == "g":
            raise OSError(28, "No space left on device")
        real(name, *args, **kw)

    monkeypatch.setattr(b.store, "put_vm", full_disk)
    run = migrate(a, b)
    check_one_host(run)
    assert run.where == "source"
    # the destination's own failure is not a lost connection: the source learns the cause
    assert "No space left on device" in run.source_job.error, run.source_job.error
    assert "connection lost" not in run.dest_job.error
