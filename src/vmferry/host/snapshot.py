"""Snapshots: the migration stream written to a file, and a VM restored from one.

The same session machines as a live migration do the work: a :class:`SourceSession` in
offline mode writes the stream, a :class:`DestinationSession` reads it back.  A saved VM
keeps running afterwards (if it was running); a restore builds the VM on this host, checks
every record before using it, and registers the VM only once the whole file was valid.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmferry.errors import ApiError, ConfigError, HostError, StreamDecodeError, VmferryError
from vmferry.host.clocks import MonotonicClock
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import StreamDecoder

if TYPE_CHECKING:
    from vmferry.host.daemon import HostDaemon

CHUNK = 8 * 1024 * 1024


def save_vm(daemon: HostDaemon, name: str, path: Path) -> dict[str, Any]:
    """Write VM ``name`` to ``path`` as a vmferry stream; the VM keeps its runstate."""
    hosted = daemon.get_vm(name)
    if hosted.vm is None or hosted.runner is None or hosted.runstate not in ("running",
                                                                             "paused"):
        raise ApiError(409, f"VM {name} is {hosted.runstate} and cannot be saved")
    was_running = hosted.vm.running
    session = SourceSession(hosted.vm, MigrationParams(offline=True), MonotonicClock(),
                            guest=hosted.runner)
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as f:
            bufs = session.start()
            while bufs:
                f.writelines(bufs)
                bufs = session.next_buffers()
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        session.fail("write snapshot", str(exc))
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise HostError(f"save {name} to {path}: {exc.strerror or exc}") from exc
    stats = session.complete({})
    for h in hosted.vm.handlers.values():
        h.resume_source()
    if was_running:
        hosted.runner.resume()
    return {"vm": name, "path": str(path), "bytes": path.stat().st_size,
            "stats": stats.to_json()}


def restore_vm(daemon: HostDaemon, path: Path, start: bool = True) -> dict[str, Any]:
    """Build a VM from the stream in ``path``; nothing is registered unless all of it
    decodes and loads."""
    session = DestinationSession(MonotonicClock(), factory=daemon.build_vm,
                                 check_config=lambda cfg: _free_name(daemon, cfg))
    decoder = StreamDecoder()
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                decoder.feed(chunk)
                for rec in decoder.events():
                    session.receive(rec)
        decoder.eof()
        session.finish(start=False)
    except OSError as exc:
        session.abort()
        raise HostError(f"restore from {path}: {exc.strerror or exc}") from exc
    except (StreamDecodeError, VmferryError) as exc:
        session.abort()
        raise ApiError(400, f"restore from {path}: {type(exc).__name__}: {exc}") from exc
    vm = session.vm
    assert vm is not None
    daemon.adopt_loaded(session, start)
    return {"vm": vm.name, "path": str(path), "runstate": "running" if start else "paused"}


def _free_name(daemon: HostDaemon, config: Any) -> None:
    try:
        daemon.check_name_free(str(config.get("name")))
    except ApiError as exc:  # inside the session a refusal is a configuration error
        raise ConfigError(exc.message) from exc
