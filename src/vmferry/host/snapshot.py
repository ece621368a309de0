"""Snapshots: the migration stream written to a file, and a VM restored from one.

The same session machines as a live migration do the work: a :class:`SourceSession` in
offline mode writes the stream, a :class:`DestinationSession` reads it back.  A saved VM
keeps running afterwards (if it was running); a restore builds the VM on this host, checks
every record before using it, and registers the VM only once the whole file was valid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmferry.errors import ApiError, BadMagic, ConfigError, HostError, VmferryError
from vmferry.host.clocks import MonotonicClock
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import StreamDecoder

if TYPE_CHECKING:
    from vmferry.host.daemon import HostDaemon

CHUNK = 8 * 1024 * 1024


def save_vm(daemon: HostDaemon, name: str, path: str, force: bool = False) -> dict[str, Any]:
    """Write VM ``name`` to ``path`` (inside the images directory) as a vmferry stream; the
    VM keeps its runstate.  An existing file is replaced only with ``force`` (else 409
    ``FileExists``, before the VM is touched).  On any failure the save undoes itself:
    the guest runs again if it ran, its devices are back to RUNNING, and no file is left
    behind."""
    if not force:  # refuse before the VM is touched (commit checks again, atomically)
        daemon.images.create(path, overwrite=False).discard()
    hosted = daemon.begin_save(name)
    assert hosted.vm is not None and hosted.runner is not None
    try:
        out = daemon.images.create(path, overwrite=force)
    except BaseException:
        daemon.end_save(hosted)
        raise
    session = SourceSession(hosted.vm, MigrationParams(offline=True), MonotonicClock(),
                            guest=hosted.runner)
    was_running = hosted.vm.running
    try:
        bufs = session.start()
        while bufs:
            out.file.writelines(bufs)
            bufs = session.next_buffers()
        out.commit()
    except BaseException as exc:
        out.discard()
        step = session.current_step()
        session.fail(step, describe(exc))
        daemon.end_save(hosted)
        if isinstance(exc, ApiError):
            raise
        if isinstance(exc, OSError):
            raise HostError(f"save {name} to {path}: {exc.strerror or exc}") from exc
        if isinstance(exc, VmferryError | ValueError | UnicodeError | OverflowError):
            raise ApiError(400, f"save {name}: {describe(exc)} (the VM runs on as before)",
                           type(exc).__name__, step) from exc
        raise
    stats = session.complete({})
    with hosted.runner.lock:
        for h in hosted.vm.handlers.values():
            h.resume_source()
    if was_running:
        hosted.runner.resume()
    daemon.end_save(hosted)
    return {"vm": name, "path": str(out.path), "bytes": out.path.stat().st_size,
            "stats": stats.to_json()}


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def restore_vm(daemon: HostDaemon, path: str, start: bool = True) -> dict[str, Any]:
    """Build a VM from the stream in ``path`` (a regular file inside the images directory);
    nothing is registered unless all of it decodes and loads."""
    f, where = daemon.images.open_read(path)
    session = DestinationSession(MonotonicClock(), factory=daemon.build_vm,
                                 check_config=lambda cfg: _check_config(daemon, cfg))
    decoder = StreamDecoder()
    try:
        with f:
            while chunk := f.read(CHUNK):
                decoder.feed(chunk)
                for rec in decoder.events():
                    session.receive(rec)
        decoder.eof()
        session.finish(start=False)
    except OSError as exc:
        session.abort()
        raise HostError(f"restore from {path}: {exc.strerror or exc}") from exc
    except BadMagic as exc:  # not ours: say nothing of what the file holds
        session.abort()
        raise ApiError(400, f"restore from {path}: not a vmferry stream",
                       "BadMagic") from exc
    except ApiError:
        session.abort()
        raise
    except (VmferryError, ValueError, UnicodeError, OverflowError) as exc:
        session.abort()
        raise ApiError(400, f"restore from {path}: {describe(exc)}",
                       type(exc).__name__) from exc
    except BaseException:
        session.abort()
        raise
    vm = session.vm
    assert vm is not None
    daemon.adopt_loaded(session, start)
    return {"vm": vm.name, "path": str(where), "runstate": "running" if start else "paused"}


def _check_config(daemon: HostDaemon, config: Any) -> None:
    """A restored VM's configuration: a free name, a definition this host can hold."""
    if not isinstance(config, dict):
        raise ConfigError("the stream's configuration is not a table")
    daemon.check_definition(config.get("definition", config))
    daemon.check_name_free(str(config.get("name")))
