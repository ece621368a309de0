"""The inter-host migration channel: typed frames, one transition table, one sans-IO
connection object, and the switchover rules both hosts follow.

``Connection(Role.SOURCE)`` / ``Connection(Role.DESTINATION)``: ``receive_data(bytes)``,
``next_event() -> event | NEED_DATA``, ``send(event) -> buffers``.  See
:mod:`~vmferry.migration.channel.table` for the states and ``docs/channel.md`` for the
protocol.
"""

from __future__ import annotations

from vmferry.migration.channel.connection import NEED_DATA, Connection
from vmferry.migration.channel.frames import (
    MAJOR,
    MINOR,
    Abort,
    Closed,
    Command,
    Commit,
    Data,
    Error,
    Event,
    Hello,
    Loaded,
    Reject,
    Resolve,
    Resumed,
    StreamEnd,
    SwitchoverAck,
    Welcome,
)
from vmferry.migration.channel.status import ErrorKind, Status
from vmferry.migration.channel.switchover import MODES, Rules, Verdict, decide
from vmferry.migration.channel.table import TERMINAL, TRANSITIONS, Role, State, mermaid

__all__ = [
    "MAJOR",
    "MINOR",
    "MODES",
    "NEED_DATA",
    "TERMINAL",
    "TRANSITIONS",
    "Abort",
    "Closed",
    "Command",
    "Commit",
    "Connection",
    "Data",
    "Error",
    "ErrorKind",
    "Event",
    "Hello",
    "Loaded",
    "Reject",
    "Resolve",
    "Resumed",
    "Role",
    "Rules",
    "State",
    "Status",
    "StreamEnd",
    "SwitchoverAck",
    "Verdict",
    "Welcome",
    "decide",
    "mermaid",
]
