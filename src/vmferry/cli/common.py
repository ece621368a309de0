"""Shared CLI helpers: host clients, JSON output, number formatting."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console

from vmferry.host.client import HostClient

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


def client(url: str) -> HostClient:
    return HostClient(url)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
