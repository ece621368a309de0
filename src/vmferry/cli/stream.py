"""``vmferry stream inspect``: decode a saved stream and summarise it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click
from rich.table import Table

from vmferry.cli.common import JSON_OPTION, console, emit_json, esc, human_bytes
from vmferry.errors import StreamDecodeError
from vmferry.migration.stream.inspect import summarize


@click.group("stream")
def command() -> None:
    """Work with saved migration streams."""


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            yield chunk


@command.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@JSON_OPTION
def inspect(file: Path, as_json: bool) -> None:
    """Decode FILE and summarise records, pages, bytes, vCPUs and devices."""
    try:
        s = summarize(_chunks(file))
    except StreamDecodeError as exc:
        click.echo(f"vmferry: {file}: invalid stream: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    if as_json:
        emit_json(s.to_json())
        return
    vm = s.vm
    console.print(
        f"[bold]{esc(file)}[/]: vmferry stream v{s.version[0]}.{s.version[1]}, "
        f"{human_bytes(s.bytes)}, VM {esc(vm.get('name'))} ({esc(vm.get('arch'))}, "
        f"{esc(vm.get('memory_mib'))} MiB, {esc(vm.get('vcpus'))} vCPUs)"
    )
    table = Table("record", "count")
    for name, count in sorted(s.records.items()):
        table.add_row(esc(name), str(count))
    console.print(table)
    console.print(
        f"RAM: {s.pages_raw} raw pages ({human_bytes(s.page_bytes)}), "
        f"{s.pages_zero} zero pages, {len(s.passes)} passes"
    )
    console.print(
        f"vCPUs: {len(s.vcpus)}; devices: {len(s.devices)}; "
        f"components: {esc(', '.join(s.components)) or 'none'}"
    )
