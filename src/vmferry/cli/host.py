"""``vmferry host serve``: run one host daemon in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vmferry.errors import ConfigError
from vmferry.host.serve import run_daemon
from vmferry.host.tls import TlsConfig, make_certs
from vmferry.machine.profiles import HostProfile, load_profile, parse_mitigation
from vmferry.machine.pseries import SpaprHostPlatform
from vmferry.machine.pseries_dt import PLATFORM_TABLE, platform_params
from vmferry.machine.schema import platform_model
from vmferry.machine.vm import HostContext, read_toml
from vmferry.machine.x86 import KvmPlatform


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@click.group("host")
def command() -> None:
    """Run a host daemon."""


@command.command("serve")
@click.option("--name", required=True, help="host name")
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    help="control API address (HOST:PORT; port 0 picks one)",
)
@click.option(
    "--migration-listen",
    default=None,
    help="migration listener address (default: the control host, any port)",
)
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="directory for the SQLite store, logs and ready.json",
)
@click.option(
    "--profile",
    default=None,
    help="host capability profile (e.g. arm64-linux-5.19); none: a generic host",
)
@click.option(
    "--mitigation",
    default=None,
    metavar="LEVEL|wa1=..,wa2=..,wa3=..",
    help="the host's Spectre mitigation (not_avail, avail, not_required), overriding the "
    "profile's",
)
@click.option(
    "--platform",
    "platform_file",
    default=None,
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML file describing the host platform (e.g. vfio_drivers = [\"pds\", \"mlx5\"], "
    "[spapr] and [lpm] tables for pseries guests, a [kvm] table with hide_msrs, "
    "refuse_msrs and hide_cpuid for x86_64 guests)",
)
@click.option(
    "--token-file",
    default=None,
    type=click.Path(path_type=Path, dir_okay=False),
    help="the cluster's control-API token (created with mode 0600 if missing; default "
    "<state-dir>/token, only for a loopback --listen); hosts that migrate to each other "
    "share it",
)
@click.option(
    "--images-dir",
    default=None,
    type=click.Path(path_type=Path, file_okay=False),
    help="the only directory save, restore and --stream-file paths may name (default "
    "<state-dir>/images)",
)
@click.option(
    "--tls-dir",
    default=None,
    type=click.Path(path_type=Path, file_okay=False),
    help="serve the control API and the migration listener over mutual TLS with the "
    "certificate in this directory (from 'vmferry host certs'); peers need one of the "
    "same CA",
)
@click.option(
    "--qmp-dir",
    default=None,
    type=click.Path(path_type=Path, file_okay=False),
    help="give each VM a QMP socket DIR/<vm>.qmp (QEMU Machine Protocol)",
)
def serve(
    name: str,
    listen: str,
    migration_listen: str | None,
    state_dir: Path,
    profile: str | None,
    mitigation: str | None,
    platform_file: Path | None,
    token_file: Path | None,
    images_dir: Path | None,
    tls_dir: Path | None,
    qmp_dir: Path | None,
) -> None:
    """Serve a host: control API (HTTP+JSON) and migration listener (raw TCP), both over
    mutual TLS with --tls-dir."""
    platform = load_platform(platform_file) if platform_file is not None else {}
    tls = TlsConfig.load(tls_dir) if tls_dir is not None else None
    run_daemon(
        name,
        state_dir,
        parse_address(listen),
        parse_address(migration_listen) if migration_listen else None,
        HostContext(name, host_profile(profile, mitigation), platform),
        token_file,
        tls=tls,
        images_dir=images_dir,
        qmp_dir=qmp_dir,
    )


@command.command("certs")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="directory for the CA and one sub-directory per host")
@click.option("--hosts", required=True, metavar="A,B,...", help="host names, comma-separated")
def certs(out: Path, hosts: str) -> None:
    """Create a cluster CA and a certificate per host (for host serve --tls-dir OUT/HOST)."""
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    for d in make_certs(out, names):
        click.echo(f"{d.name}: --tls-dir {d}")
    click.echo(f"CA key: {out / 'ca.key'} (keep it offline; the hosts do not need it)")


def load_platform(path: Path) -> dict[str, Any]:
    """A host platform description from a TOML file; ConfigError if it is unreadable or
    a table it carries is wrong (checked before the daemon starts)."""
    platform = read_toml(path, "platform file")
    platform_model(platform, str(path))  # types, and every key known (named if not)
    if "spapr" in platform:
        SpaprHostPlatform.from_host(HostContext(path.stem, platform=platform))
    if PLATFORM_TABLE in platform:
        platform_params(platform[PLATFORM_TABLE])
    if "kvm" in platform:
        KvmPlatform.parse(platform)
    return platform


def host_profile(name: str | None, mitigation: str | None) -> HostProfile | None:
    """The profile a host serves with; ConfigError for an unknown one or a mitigation
    without a profile to apply it to."""
    if name is None:
        if mitigation is not None:
            raise ConfigError("--mitigation needs --profile")
        return None
    profile = load_profile(name)
    if mitigation is not None:
        if profile.mitigation is None:
            raise ConfigError(f"profile {name} has no mitigation to set")
        profile = profile.with_mitigation(parse_mitigation(mitigation))
    return profile
