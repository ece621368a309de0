"""Running a host daemon in the foreground: the control API (aiohttp), the migration
listener, the optional QMP sockets, until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path

from vmferry.errors import ConfigError, HostError, VmferryError
from vmferry.host.auth import is_loopback, load_or_create_token
from vmferry.host.daemon import HostDaemon
from vmferry.host.tls import TlsConfig, logging_server_context
from vmferry.machine.vm import HostContext

log = logging.getLogger("vmferry.host")


def plaintext_warnings(tls: TlsConfig | None, control: tuple[str, int],
                       migration: tuple[str, int]) -> list[str]:
    """What a host without TLS says about each listener beyond this machine."""
    if tls is not None:
        return []
    return [f"{what} listens on {address[0]} without TLS: guest memory and tokens cross the "
            "network in clear (serve with --tls-dir)"
            for what, address in (("control API", control), ("migration listener", migration))
            if not is_loopback(address[0])]


def run_daemon(
    name: str,
    state_dir: Path,
    listen: tuple[str, int],
    migration_listen: tuple[str, int] | None = None,
    context: HostContext | None = None,
    token_file: Path | None = None,
    tls: TlsConfig | None = None,
    images_dir: Path | None = None,
    *,
    qmp_dir: Path | None = None,
) -> None:
    """Run a host in the foreground until SIGINT/SIGTERM.  The control API requires the
    token in ``token_file`` (created if missing; default ``<state-dir>/token``, allowed only
    for a loopback address: a host others can reach shares an explicit token file with its
    cluster).  With ``qmp_dir``, each VM gets a QMP socket there (:mod:`vmferry.host.qmp`).
    Every way it cannot start is a one-line VmferryError (the traceback of an unexpected
    one goes to the log)."""
    try:
        _run_daemon(name, state_dir, listen, migration_listen, context, token_file, tls,
                    images_dir, qmp_dir)
    except VmferryError:
        raise
    except OSError as exc:
        raise HostError(f"host {name}: {exc.strerror or exc}"
                        + (f": {exc.filename}" if exc.filename else "")) from exc
    except Exception as exc:
        log.exception("host %s failed", name)
        raise HostError(f"host {name} failed: {type(exc).__name__}: {exc} "
                        f"(details in {state_dir / 'daemon.log'})") from exc


def _run_daemon(
    name: str,
    state_dir: Path,
    listen: tuple[str, int],
    migration_listen: tuple[str, int] | None,
    context: HostContext | None,
    token_file: Path | None,
    tls: TlsConfig | None,
    images_dir: Path | None,
    qmp_dir: Path | None,
) -> None:
    # the control API's modules (aiohttp) load only when a daemon runs: the CLI stays quick
    from vmferry.host.api import make_app
    from vmferry.host.qmp import QmpServer

    if token_file is None and not is_loopback(listen[0]):
        raise ConfigError(
            f"the control API would listen on {listen[0]}, beyond this machine: "
            "give the cluster's --token-file"
        )
    if state_dir.exists() and not state_dir.is_dir():
        raise HostError(f"state dir {state_dir} is not a directory")
    state_dir.mkdir(parents=True, exist_ok=True)
    token = load_or_create_token(token_file or state_dir / "token")
    daemon = HostDaemon(name, state_dir, listen, migration_listen, context, token, tls,
                        images_dir)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        handlers=[logging.FileHandler(state_dir / "daemon.log"), logging.StreamHandler()],
    )
    for warning in plaintext_warnings(tls, listen, daemon.migration_listen):
        log.warning("%s", warning)
    probe = daemon.context.iommu
    if probe is not None:
        log.info("IOMMU boot probe (%s, seed %d): groups %s", probe.mode, probe.seed,
                 probe.groups)
        for dev, why in probe.failures.items():
            log.warning("IOMMU boot probe: %s unusable: %s", dev, why)
    daemon.recover(settle=False)  # records only: VMs are rebuilt once the API answers
    daemon.start_migration_listener()

    async def main() -> None:
        from aiohttp import web

        runner = web.AppRunner(make_app(daemon), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, listen[0], listen[1], ssl_context=(
            logging_server_context(tls, "control API") if tls is not None else None))
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        host, port = sockets[0].getsockname()[:2]
        daemon.control_url = f"{'https' if tls is not None else 'http'}://{host}:{port}"
        threading.Thread(target=daemon.settle_recovered, name="recover", daemon=True).start()
        qmp = QmpServer(daemon, qmp_dir) if qmp_dir is not None else None
        if qmp is not None:
            await qmp.start()
        daemon.write_ready_file()
        log.info(
            "host %s: control %s, migration %s:%d",
            name,
            daemon.control_url,
            *daemon.migration_address,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("host %s stopping", name)
        if qmp is not None:
            await qmp.stop()
        await asyncio.to_thread(daemon.shutdown)
        await runner.cleanup()

    asyncio.run(main())
