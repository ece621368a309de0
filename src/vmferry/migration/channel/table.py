"""The channel's legal moves: one literal table for both roles.

Theory of operation
-------------------
Each end of a connection tracks one :class:`State`: the phase of the exchange as that end
sees it.  The two roles walk the same states with mirrored moves::

    source:       IDLE -HELLO>  HANDSHAKE -<WELCOME  STREAMING -STREAM_END>  LOADING
                  -<LOADED  DECIDING -COMMIT>  COMMITTING -<RESUMED  DONE
    destination:  IDLE -<HELLO  HANDSHAKE -WELCOME>  STREAMING -<STREAM_END  LOADING
                  -LOADED>  DECIDING -<COMMIT  COMMITTING -RESUMED>  DONE

(``>`` sends, ``<`` receives).  The source gives up with ABORT in any phase before
COMMIT; the destination with REJECT at the handshake and ERROR afterwards, including after
COMMIT (the resume failed: nothing runs there).  Both lead to ABORTED, where both sides
agree the guest stays on the source.  COMMITTING is the point of no return for the
source: it has no ABORT.

A second, short exchange resolves doubt: a source whose connection broke after it sent
COMMIT opens a new connection with RESOLVE and hears RESUMED (the destination runs the
guest) or ERROR (it never will).  The same table holds it (IDLE -RESOLVE- RESOLVING).

What is in the table and what is in code:

* every (role, state, direction, command) move is in :data:`TRANSITIONS`; DONE, ABORTED
  and ERROR have empty rows, so "no entry" always means illegal;
* in code (:mod:`~vmferry.migration.channel.connection`): frames the peer had in flight
  when this side reached DONE or ABORTED are dropped, not judged; any exception moves the
  connection to ERROR; ``send_failure`` lets a side that hit an error still say why (an
  ERROR or ABORT frame) whatever state it is in;
* deadlines are the driver's: it reads a clock and calls ``send(Abort(...))`` (source) or
  ``send(Error(...))`` (destination) when one passes.
"""

from __future__ import annotations

import enum

from vmferry.migration.channel.frames import Command


class Role(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class State(enum.Enum):
    IDLE = "idle"
    HANDSHAKE = "handshake"
    STREAMING = "streaming"
    LOADING = "loading"
    DECIDING = "deciding"
    COMMITTING = "committing"
    RESOLVING = "resolving"
    DONE = "done"
    ABORTED = "aborted"
    ERROR = "error"


class Dir(enum.Enum):
    SEND = ">"
    RECV = "<"


S, C = State, Command
SEND, RECV = Dir.SEND, Dir.RECV

TRANSITIONS: dict[Role, dict[State, dict[tuple[Dir, Command], State]]] = {
    Role.SOURCE: {
        S.IDLE: {(SEND, C.HELLO): S.HANDSHAKE, (SEND, C.RESOLVE): S.RESOLVING,
                 (SEND, C.ABORT): S.ABORTED},
        S.HANDSHAKE: {(RECV, C.WELCOME): S.STREAMING, (RECV, C.REJECT): S.ABORTED,
                      (SEND, C.ABORT): S.ABORTED},
        S.STREAMING: {(SEND, C.DATA): S.STREAMING, (SEND, C.STREAM_END): S.LOADING,
                      (SEND, C.ABORT): S.ABORTED, (RECV, C.ERROR): S.ABORTED,
                      (RECV, C.SWITCHOVER_ACK): S.STREAMING},
        S.LOADING: {(RECV, C.LOADED): S.DECIDING, (RECV, C.ERROR): S.ABORTED,
                    (SEND, C.ABORT): S.ABORTED},
        S.DECIDING: {(SEND, C.COMMIT): S.COMMITTING, (SEND, C.ABORT): S.ABORTED,
                     (RECV, C.ERROR): S.ABORTED},
        S.COMMITTING: {(RECV, C.RESUMED): S.DONE, (RECV, C.ERROR): S.ABORTED},
        S.RESOLVING: {(RECV, C.RESUMED): S.DONE, (RECV, C.ERROR): S.ABORTED},
        S.DONE: {},
        S.ABORTED: {},
        S.ERROR: {},
    },
    Role.DESTINATION: {
        S.IDLE: {(RECV, C.HELLO): S.HANDSHAKE, (RECV, C.RESOLVE): S.RESOLVING,
                 (RECV, C.ABORT): S.ABORTED},
        S.HANDSHAKE: {(SEND, C.WELCOME): S.STREAMING, (SEND, C.REJECT): S.ABORTED,
                      (RECV, C.ABORT): S.ABORTED},
        S.STREAMING: {(RECV, C.DATA): S.STREAMING, (RECV, C.STREAM_END): S.LOADING,
                      (RECV, C.ABORT): S.ABORTED, (SEND, C.ERROR): S.ABORTED,
                      (SEND, C.SWITCHOVER_ACK): S.STREAMING},
        S.LOADING: {(SEND, C.LOADED): S.DECIDING, (SEND, C.ERROR): S.ABORTED,
                    (RECV, C.ABORT): S.ABORTED},
        S.DECIDING: {(RECV, C.COMMIT): S.COMMITTING, (RECV, C.ABORT): S.ABORTED,
                     (SEND, C.ERROR): S.ABORTED},
        S.COMMITTING: {(SEND, C.RESUMED): S.DONE, (SEND, C.ERROR): S.ABORTED},
        S.RESOLVING: {(SEND, C.RESUMED): S.DONE, (SEND, C.ERROR): S.ABORTED},
        S.DONE: {},
        S.ABORTED: {},
        S.ERROR: {},
    },
}  # fmt: skip

#: states in which the exchange is over (their rows are empty)
TERMINAL = frozenset({S.DONE, S.ABORTED, S.ERROR})


def mermaid(role: Role) -> str:
    """A mermaid state diagram of one role's moves, generated from :data:`TRANSITIONS`."""
    lines = ["stateDiagram-v2", f"    %% {role.value}"]
    for state, row in TRANSITIONS[role].items():
        for (direction, cmd), target in row.items():
            verb = "send" if direction is SEND else "recv"
            lines.append(f"    {state.name} --> {target.name}: {verb} {cmd.name}")
    for state in (S.DONE, S.ABORTED):
        lines.append(f"    {state.name} --> [*]")
    lines.append("    note right of ERROR: any state, on any exception")
    return "\n".join(lines)


def markdown_table(role: Role) -> str:
    """One role's rows of :data:`TRANSITIONS` as a Markdown table (for docs/channel.md)."""
    lines = ["| state | move | next state |", "|---|---|---|"]
    for state, row in TRANSITIONS[role].items():
        if not row:
            lines.append(f"| {state.name} | (none) | |")
        for (direction, cmd), target in row.items():
            verb = "send" if direction is SEND else "receive"
            lines.append(f"| {state.name} | {verb} {cmd.name} | {target.name} |")
    return "\n".join(lines)
