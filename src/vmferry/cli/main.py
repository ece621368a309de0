"""The ``vmferry`` command.  Formatting only: every verb calls into the library.

Each command group lives in its own module and is listed in ``_COMMANDS``; a module exposes
a click command or group named ``command``.
"""

from __future__ import annotations

import importlib
import sys

import click

from vmferry.errors import VmferryError

_COMMANDS: tuple[str, ...] = (
    "demo", "host", "vm", "migrate", "job", "stream", "matrix", "explore", "lpm", "events",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmferry")
def cli() -> None:
    """Live migration of VMs with assigned devices and a paravirtual IOMMU."""


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
        click.echo(f"vmferry: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
