"""``vmferry job``."""

from vmferry.cli.jobs import command

__all__ = ["command"]
