"""A real host daemon's control API served in-process on 127.0.0.1, for API tests.

The app runs on its own event loop in a thread, so tests talk to it through the real
synchronous client (or raw aiohttp requests) exactly as the CLI does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from vmferry.host.api import make_app
from vmferry.host.client import HostClient
from vmferry.host.daemon import HostDaemon
from vmferry.machine.vm import HostContext

TOKEN = "t" * 32


class AppHost:
    def __init__(self, daemon: HostDaemon, url: str) -> None:
        self.daemon, self.url = daemon, url

    def client(self, token: str | None = TOKEN, timeout: float = 30.0) -> HostClient:
        return HostClient(self.url, token, timeout)


@contextmanager
def app_host(state_dir: Path, name: str = "A", with_listener: bool = False,
             **daemon_kw: Any) -> Iterator[AppHost]:
    daemon = HostDaemon(name, state_dir, context=HostContext(name), token=TOKEN, **daemon_kw)
    if with_listener:
        daemon.start_migration_listener()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        runner = web.AppRunner(make_app(daemon), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        daemon.control_url = holder["url"] = f"http://127.0.0.1:{port}"
        ready.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "control API did not start"
    try:
        yield AppHost(daemon, holder["url"])
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        daemon.shutdown()
