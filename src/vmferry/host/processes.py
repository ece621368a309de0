"""Start host daemons as child processes and wait until they are ready."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vmferry.errors import HostError
from vmferry.host.auth import TOKEN_FILE_ENV, load_or_create_token
from vmferry.host.client import HostClient
from vmferry.host.tls import TlsConfig


@dataclass
class HostProcess:
    name: str
    state_dir: Path
    proc: subprocess.Popen[bytes]
    control_url: str = ""
    #: the control API's bearer token (from the host's token file)
    token: str = ""
    #: the directory save, restore and stream_file paths are confined to
    images_dir: Path = Path()
    #: the host's TLS directory when it serves TLS (its certificate is the client's too)
    tls_dir: Path | None = None

    def client(self, timeout: float = 30.0) -> HostClient:
        """A control-API client for this host, with its token (and certificate)."""
        tls = TlsConfig.load(self.tls_dir).client_context() if self.tls_dir else None
        return HostClient(self.control_url, self.token, timeout, tls)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spawn_host(
    name: str,
    state_dir: Path,
    listen: str = "127.0.0.1:0",
    timeout: float = 30.0,
    extra_args: list[str] | None = None,
    token_file: Path | None = None,
    tls_dir: Path | None = None,
) -> HostProcess:
    """Start ``vmferry host serve`` and wait for its ready file.  The host's token file is
    ``token_file``, else ``$VMFERRY_TOKEN_FILE``, else ``token`` beside ``state_dir`` (so
    hosts started under one directory form one cluster); it is created if missing.  Unless
    ``extra_args`` name one, the images directory is ``images`` beside ``state_dir``
    (shared the same way)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if token_file is None:
        env = os.environ.get(TOKEN_FILE_ENV)
        token_file = Path(env) if env else state_dir.parent / "token"
    token = load_or_create_token(token_file)
    extra = extra_args or []
    images_dir = None if "--images-dir" in extra else state_dir.parent / "images"
    ready = state_dir / "ready.json"
    with contextlib.suppress(FileNotFoundError):
        ready.unlink()
    log = open(state_dir / "stdio.log", "ab")  # noqa: SIM115 - owned by the child
    cmd = [
        sys.executable,
        "-m",
        "vmferry",
        "host",
        "serve",
        "--name",
        name,
        "--listen",
        listen,
        "--state-dir",
        str(state_dir),
        "--token-file",
        str(token_file),
        *(["--images-dir", str(images_dir)] if images_dir is not None else []),
        *(["--tls-dir", str(tls_dir)] if tls_dir is not None else []),
        *(extra_args or []),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    host = HostProcess(name, state_dir, proc, token=token, tls_dir=tls_dir,
                       images_dir=images_dir or Path(extra[extra.index("--images-dir") + 1]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (state_dir / "stdio.log").read_text(errors="replace")[-2000:]
            raise HostError(f"host {name} exited with {proc.returncode}:\n{tail}")
        try:
            info = json.loads(ready.read_text())
            if info.get("pid") == proc.pid:
                host.control_url = info["control_url"]
                return host
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    host.kill()
    raise HostError(f"host {name} did not become ready within {timeout:.0f} s")
