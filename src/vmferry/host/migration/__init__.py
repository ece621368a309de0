"""Migration workers: the source's sending thread and the destination's receiving one,
driving the sans-IO channel (:mod:`vmferry.migration.channel`) over a socket.

* :mod:`~vmferry.host.migration.common`: parameters, bounds, the peers' control APIs;
* :mod:`~vmferry.host.migration.source`: :class:`SourceWorker`, one thread per job;
* :mod:`~vmferry.host.migration.destination`: the listener and :class:`DestinationWorker`.

Both keep the sans-IO sessions in charge of *what* happens to the VM and the channel's
connection in charge of the exchange around it; these modules move bytes and turn every
way a connection can fail into a session failure with the step named.
"""

from __future__ import annotations

from vmferry.host.migration.common import (
    ACTIVE_STALL_S,
    HELLO_TIMEOUT_S,
    IDLE_TIMEOUT_S,
    RECEIVE_BUFFER,
    SETTLE_S,
    STALL_BASE_S,
    STALL_PER_LIMIT,
    VERIFY_S_PER_GIB,
    ask_destination,
    ask_destination_outcome,
    destination_ok,
    parse_params,
    remote_text,
    stall_bound_s,
)
from vmferry.host.migration.destination import (
    DestinationWorker,
    refuse_connection,
    serve_incoming,
)
from vmferry.host.migration.source import SourceWorker, start_source_job

__all__ = [
    "ACTIVE_STALL_S",
    "HELLO_TIMEOUT_S",
    "IDLE_TIMEOUT_S",
    "RECEIVE_BUFFER",
    "SETTLE_S",
    "STALL_BASE_S",
    "STALL_PER_LIMIT",
    "VERIFY_S_PER_GIB",
    "DestinationWorker",
    "SourceWorker",
    "ask_destination",
    "ask_destination_outcome",
    "destination_ok",
    "parse_params",
    "refuse_connection",
    "remote_text",
    "serve_incoming",
    "stall_bound_s",
    "start_source_job",
]
