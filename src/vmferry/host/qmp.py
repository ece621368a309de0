"""QMP for real clients: one QEMU Machine Protocol socket per VM.

``vmferry host serve --qmp-dir DIR`` gives every VM on the host a unix socket
``DIR/<vm>.qmp`` that speaks QMP the way a QEMU process does, so that tools written for
QEMU (``qemu.qmp``, libvirt-style scripts, ``qmp-shell``) can drive vmferry.

Theory of operation
-------------------
A connection starts with the server greeting; until the client sends
``qmp_capabilities``, every other command is refused with ``CommandNotFound`` (QEMU's
capabilities-negotiation mode).  Then the commands of :data:`COMMANDS` run against the
daemon:

==========================  ==========================================================
``query-status``            runstate with QEMU's names (running, paused, postmigrate)
``stop`` / ``cont``         pause / run the vCPUs
``migrate``                 ``uri`` is the destination host's control URL; returns at
                            once, the migration runs on (as QEMU's does)
``migrate_cancel``          cancel the VM's running migration
``query-migrate``           the latest outgoing migration (QEMU's MigrationInfo)
``migrate-set-parameters``  ``downtime-limit`` (ms) and ``max-bandwidth`` (bytes/s,
                            0 = unlimited): for the next migration and, if one runs,
                            for that one from its next batch on
``query-migrate-parameters``  the same two
``query-commands``          the list above
==========================  ==========================================================

Events, each with QEMU's ``timestamp``: ``STOP`` and ``RESUME`` (the vCPUs stop at
switchover and resume on the source if a migration fails there), ``MIGRATION`` with
QEMU's status names (setup, active, device, completed, failed, cancelled) and
``MIGRATION_PASS`` (``pass``: the pass number starting).  QEMU sends the migration
events only once the ``events`` migration capability is on; vmferry always sends them.

Units are QMP's: ``downtime-limit`` in milliseconds, ``max-bandwidth`` in bytes per
second, ``ram.mbps`` in megabits per second.

The sockets follow the VMs: one appears when a VM is created or arrives, stays while the
VM's record stays (in ``postmigrate`` after it left, as a QEMU source process does until
it is shut down) and goes when the record goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmferry import __version__
from vmferry.errors import ApiError, VmferryError
from vmferry.host.datachannels import DEFAULT_PARALLEL
from vmferry.host.events import Event
from vmferry.migration.multichannel import MAX_CHANNELS

if TYPE_CHECKING:
    from vmferry.host.daemon import HostDaemon

log = logging.getLogger("vmferry.host.qmp")

MIB = 1 << 20
#: vmferry runstate -> (QMP status, running)
STATUS = {
    "running": ("running", True),
    "paused": ("paused", False),
    "migrating": ("running", True),
    "migrated": ("postmigrate", False),
    "failed": ("internal-error", False),
    "recovering": ("restore-vm", False),  # a restarted daemon rebuilds it
}
FINISHED = ("completed", "failed", "cancelled")


MAX_MESSAGE = 1 << 20


class JsonSplitter:
    """Cuts a byte stream into top-level JSON values, as QEMU's streaming parser does:
    clients need not end a message with a newline (``qemu.qmp`` does not).  Sans-IO:
    :meth:`feed` takes bytes and returns the complete messages they finish."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scanned = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        i = self._scanned
        while i < len(self._buf):
            ch = self._buf[i]
            i += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == 0x5C:  # backslash
                    self._escape = True
                elif ch == 0x22:
                    self._in_string = False
                continue
            if ch == 0x22:
                self._in_string = True
            elif ch in (0x7B, 0x5B):  # { [
                self._depth += 1
            elif ch in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth <= 0:
                    out.append(bytes(self._buf[:i]))
                    del self._buf[:i]
                    i, self._depth = 0, 0
        self._scanned = i
        if len(self._buf) > MAX_MESSAGE:
            raise QmpError("GenericError", f"QMP message longer than {MAX_MESSAGE} bytes")
        return out


class QmpError(Exception):
    """A command failed: QMP error ``class`` and ``desc``."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls, self.desc = cls, desc


def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1e6)}


def greeting() -> dict[str, Any]:
    major, minor, micro = ([int(p) for p in __version__.split(".")[:3]] + [0, 0, 0])[:3]
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                "package": f"vmferry {__version__}"},
                    "capabilities": []}}


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")


class VmQmp:
    """The QMP endpoint of one VM: its socket, its clients, its migration parameters."""

    def __init__(self, daemon: HostDaemon, name: str, path: Path) -> None:
        self.d, self.name, self.path = daemon, name, path
        self.clients: set[_Client] = set()
        self.server: asyncio.Server | None = None
        #: QMP units: ms and bytes/s (0: unlimited)
        self.params: dict[str, int] = {"downtime-limit": 300, "max-bandwidth": 0,
                                       "multifd-channels": DEFAULT_PARALLEL}
        self.job_state: dict[str, tuple[str, int]] = {}
        self.commands: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "query-status": self.query_status, "stop": self.stop, "cont": self.cont,
            "migrate": self.migrate, "migrate_cancel": self.migrate_cancel,
            "query-migrate": self.query_migrate,
            "migrate-set-parameters": self.set_parameters,
            "query-migrate-parameters": self.query_parameters,
            "query-commands": self.query_commands,
        }

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self.clients):
            c.writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def broadcast(self, event: str, data: dict[str, Any] | None = None) -> None:
        msg = {"event": event, "data": data or {}, "timestamp": timestamp()}
        for c in list(self.clients):
            if c.negotiated:
                c.send(msg)

    # --- a connection --------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self.clients.add(client)
        client.send(greeting())
        splitter = JsonSplitter()
        try:
            while data := await reader.read(65536):
                for message in splitter.feed(data):
                    client.send(await self.handle(client, message))
                    await writer.drain()
        except QmpError as exc:
            client.send({"error": {"class": exc.cls, "desc": exc.desc}})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.clients.discard(client)
            writer.close()

    async def handle(self, client: _Client, line: bytes) -> dict[str, Any]:
        """The reply to one message."""
        msg_id: Any = None
        try:
            try:
                msg = json.loads(line)
            except ValueError as exc:
                raise QmpError("GenericError", f"JSON parse error, {exc}") from exc
            if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
                raise QmpError("GenericError", "QMP input must be a JSON object with "
                                               "'execute'")
            msg_id = msg.get("id")
            args = msg.get("arguments", {})
            if not isinstance(args, dict):
                raise QmpError("GenericError", "QMP input member 'arguments' must be an "
                                               "object")
            result = await self._execute(client, msg["execute"], args)
        except QmpError as exc:
            out: dict[str, Any] = {"error": {"class": exc.cls, "desc": exc.desc}}
        else:
            out = {"return": result}
        if msg_id is not None:
            out["id"] = msg_id
        return out

    async def _execute(self, client: _Client, command: str, args: dict[str, Any]) -> Any:
        if command == "qmp_capabilities":
            if client.negotiated:
                raise QmpError("CommandNotFound", "Capabilities negotiation is already "
                                                  "complete, command ignored")
            if args.get("enable"):
                raise QmpError("GenericError", f"Capability '{args['enable'][0]}' is not "
                                               "available")
            client.negotiated = True
            return {}
        if not client.negotiated:
            raise QmpError("CommandNotFound", "Expecting capabilities negotiation with "
                                              "'qmp_capabilities'")
        handler = self.commands.get(command)
        if handler is None:
            raise QmpError("CommandNotFound", f"The command {command} has not been found")
        try:
            return await handler(args)
        except ApiError as exc:
            raise QmpError("GenericError", exc.message) from exc
        except VmferryError as exc:
            raise QmpError("GenericError", str(exc)) from exc

    # --- commands ------------------------------------------------------------------

    async def query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        hosted = self.d.get_vm(self.name)
        status, running = STATUS.get(hosted.runstate, (hosted.runstate, False))
        if hosted.runstate == "migrating":
            job = self._latest_job()
            if job is not None and job.status == "device":
                status, running = "finish-migrate", False
        return {"status": status, "running": running, "singlestep": False}

    async def stop(self, args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.to_thread(self.d.set_running, self.name, False)
        return {}

    async def cont(self, args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.to_thread(self.d.set_running, self.name, True)
        return {}

    async def migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        uri = args.get("uri")
        if not isinstance(uri, str) or not uri.startswith(("http://", "https://")):
            raise QmpError("GenericError", "Parameter 'uri' expects the destination host's "
                                           "control URL (http://HOST:PORT)")
        params: dict[str, Any] = {"downtime_limit_ms": float(self.params["downtime-limit"])}
        if self.params["max-bandwidth"]:
            params["max_bandwidth_mib"] = self.params["max-bandwidth"] / MIB
        params["parallel"] = self.params["multifd-channels"]
        job = await asyncio.to_thread(self.d.migrate, self.name, uri, params)
        log.info("QMP migrate of %s to %s: job %s", self.name, uri, job.id)
        return {}

    async def migrate_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        job = self._latest_job()
        if job is not None and job.status not in FINISHED:
            self.d.cancel(job.id)
        return {}

    async def query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        job = self._latest_job()
        if job is None:
            return {}
        return migration_info(self.d.job_json(job))

    async def set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        unknown = set(args) - set(self.params)
        if unknown:
            raise QmpError("GenericError", f"Parameter '{sorted(unknown)[0]}' is unexpected")
        for key, value in args.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise QmpError("GenericError", f"Parameter '{key}' expects a non-negative "
                                               "integer")
        if args.get("multifd-channels", 1) > MAX_CHANNELS:
            raise QmpError("GenericError", "Parameter 'multifd-channels' expects a value "
                                           f"between 0 and {MAX_CHANNELS}")
        if args.get("downtime-limit") == 0:
            raise QmpError("GenericError", "Parameter 'downtime-limit' expects an integer in "
                                           "the range of 1 to 2000000 milliseconds")
        job = self._latest_job()
        if job is not None and job.status in ("setup", "active") \
                and set(args) - {"multifd-channels"}:  # fmt: skip
            changes: dict[str, Any] = {}
            if "downtime-limit" in args:
                changes["downtime_limit_ms"] = float(args["downtime-limit"])
            if "max-bandwidth" in args:
                changes["max_bandwidth_mib"] = args["max-bandwidth"] / MIB or None
            await asyncio.to_thread(self.d.set_job_params, job.id, changes)
        self.params.update(args)
        return {}

    async def query_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        return dict(self.params)

    async def query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": n} for n in sorted([*self.commands, "qmp_capabilities"])]

    def _latest_job(self) -> Any:
        with self.d.lock:
            jobs = [j for j in self.d.jobs.values() if j.vm == self.name and j.role == "source"]
        return max(jobs, key=lambda j: j.created) if jobs else None

    # --- events --------------------------------------------------------------------

    def on_job(self, job: dict[str, Any]) -> None:
        """MIGRATION on a status change, MIGRATION_PASS when a pass starts, STOP at
        switchover and RESUME when a migration fails after it."""
        if job.get("role") != "source":
            return
        status = str(job.get("status"))
        passes = job.get("stats", {}).get("passes", [])
        npass = len(passes) if isinstance(passes, list) else 0
        old_status, old_pass = self.job_state.get(job["id"], ("", -1))
        if status != old_status:
            if status == "device" or (status == "completed" and old_status != "device"):
                self.broadcast("STOP")  # the vCPUs stopped for the switchover
            self.broadcast("MIGRATION", {"status": status})
            if status in ("failed", "cancelled") and old_status == "device":
                self.broadcast("RESUME")
        if status == "active" and (old_status != "active" or npass != old_pass):
            self.broadcast("MIGRATION_PASS", {"pass": npass + 1})
        self.job_state[job["id"]] = (status, npass)

    def on_runstate(self, old: str, new: str) -> None:
        if old == "running" and new == "paused":
            self.broadcast("STOP")
        elif old == "paused" and new == "running":
            self.broadcast("RESUME")


def migration_info(job: dict[str, Any]) -> dict[str, Any]:
    """A job's statistics as QEMU's ``query-migrate`` MigrationInfo."""
    st = job.get("stats") or {}
    out: dict[str, Any] = {"status": job.get("status")}
    for key in ("total-time", "setup-time", "expected-downtime", "downtime"):
        if key in st:
            out[key] = round(float(st[key]))
    if job.get("status") != "completed":
        out.pop("downtime", None)
    ram = st.get("ram")
    if isinstance(ram, dict):
        out["ram"] = dict(ram)
    if "cpu-throttle-percentage" in st:
        out["cpu-throttle-percentage"] = st["cpu-throttle-percentage"]
    if job.get("error"):
        out["error-desc"] = job["error"]
    return out


class QmpServer:
    """Every VM's QMP socket in ``directory``, kept in step with the daemon's VMs."""

    def __init__(self, daemon: HostDaemon, directory: Path) -> None:
        self.d, self.dir = daemon, directory
        self.vms: dict[str, VmQmp] = {}
        self.runstates: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        sub = self.d.events.subscribe()
        with self.d.lock:
            present = [(h.name, h.runstate) for h in self.d.vms.values()]
        for name, runstate in present:
            await self._vm(name, runstate)
        self._task = asyncio.create_task(self._pump(sub))

    async def _pump(self, sub: Any) -> None:
        try:
            while (event := await sub.queue.get()) is not None:
                await self._on(event)
        finally:
            self.d.events.unsubscribe(sub)

    async def _on(self, event: Event) -> None:
        if event.kind == "vm":
            await self._vm(str(event.data["name"]), str(event.data["runstate"]))
        elif event.kind == "job":
            endpoint = self.vms.get(str(event.data.get("vm")))
            if endpoint is not None:
                endpoint.on_job(event.data)

    async def _vm(self, name: str, runstate: str) -> None:
        endpoint = self.vms.get(name)
        old = self.runstates.get(name, "")
        self.runstates[name] = runstate
        if runstate == "undefined":
            self.runstates.pop(name, None)
            if endpoint is not None:
                del self.vms[name]
                await endpoint.close()
            return
        if endpoint is None:
            endpoint = VmQmp(self.d, name, self.dir / f"{name}.qmp")
            try:
                await endpoint.start()
            except OSError as exc:
                log.error("QMP socket for VM %s: %s", name, exc)
                return
            self.vms[name] = endpoint
        endpoint.on_runstate(old, runstate)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for endpoint in list(self.vms.values()):
            await endpoint.close()
        self.vms.clear()
