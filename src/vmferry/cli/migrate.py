"""``vmferry migrate`` (defined with the job commands)."""

from vmferry.cli.jobs import migrate as command

__all__ = ["command"]
