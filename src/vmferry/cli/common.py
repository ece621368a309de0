"""Shared CLI helpers: host clients, JSON output, number formatting."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from vmferry.host.auth import client_token
from vmferry.host.client import HostClient
from vmferry.host.tls import TlsConfig

console = Console()
err_console = Console(stderr=True)

HOST_OPTION = click.option(
    "--host",
    "host_url",
    required=True,
    metavar="URL",
    help="control URL of the host, e.g. http://127.0.0.1:7001",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="print JSON")


#: ``vmferry --token-file FILE``, set by the command group before any command runs
_token_file: Path | None = None
#: ``vmferry --tls-dir DIR`` (or VMFERRY_TLS_DIR): the certificate the CLI presents
_tls_dir: Path | None = None


def set_token_file(path: Path | None) -> None:
    global _token_file
    _token_file = path


def set_tls_dir(path: Path | None) -> None:
    global _tls_dir
    _tls_dir = path


def client(url: str) -> HostClient:
    """A client for the host at ``url`` presenting the token from ``VMFERRY_TOKEN`` or
    ``--token-file`` (``VMFERRY_TOKEN_FILE``) and, for an https:// host, the certificate
    in ``--tls-dir`` (``VMFERRY_TLS_DIR``)."""
    tls = TlsConfig.load(_tls_dir).client_context() if _tls_dir is not None else None
    return HostClient(url, client_token(_token_file), tls=tls)


def esc(value: object) -> str:
    """Text from a host, a stream or a file, safe to put into rich markup: ``[/x]`` in a
    VM name or an error message prints as it is, never as (broken) markup."""
    return escape(str(value))


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
