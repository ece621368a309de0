"""The ``vmferry`` command.  Formatting only: every verb calls into the library.

Each command group lives in its own module and is listed in ``_COMMANDS``; a module exposes
a click command or group named ``command``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from vmferry.cli.common import emit_json, set_tls_dir, set_token_file
from vmferry.errors import ApiError, MigrationError, VmferryError

_COMMANDS: tuple[str, ...] = (
    "demo", "host", "vm", "migrate", "job", "stream", "matrix", "explore", "lpm", "events",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmferry")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="the hosts' control-API token file (or set VMFERRY_TOKEN / VMFERRY_TOKEN_FILE)",
)
@click.option(
    "--tls-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    envvar="VMFERRY_TLS_DIR",
    help="a certificate of the hosts' cluster, presented to https:// hosts (or set "
    "VMFERRY_TLS_DIR)",
)
def cli(token_file: Path | None, tls_dir: Path | None) -> None:
    """Live migration of VMs with assigned devices and a paravirtual IOMMU."""
    set_token_file(token_file)
    set_tls_dir(tls_dir)


for _name in _COMMANDS:
    cli.add_command(importlib.import_module(f"vmferry.cli.{_name}").command)


def main() -> None:
    """Console entry point: typed errors become one line on stderr and exit code 1."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except VmferryError as exc:
        if "--json" in sys.argv[1:]:
            emit_json(error_json(exc))
        else:
            click.echo(f"vmferry: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def error_json(exc: VmferryError) -> dict[str, object]:
    """An error as the control API shapes it: ``{"error": {kind, message, step}}`` (and
    the HTTP status when a host answered)."""
    if isinstance(exc, ApiError):
        out = exc.to_json()
        out["status"] = exc.status
        return out
    step = exc.step if isinstance(exc, MigrationError) else ""
    return {"error": {"kind": type(exc).__name__, "message": str(exc), "step": step}}
