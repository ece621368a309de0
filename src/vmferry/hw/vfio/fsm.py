"""The migration FSM step algorithm of ``vfio_mig_get_next_state``.

Theory of operation
-------------------
User space asks for a final state; the core walks *arcs* one at a time.  ``TABLE[cur][new]``
names the first hop from ``cur`` towards ``new`` on a device that supports every optional
state.  When that hop is a state the device lacks (P2P or PRE_COPY flavours), the algorithm
looks the hop up again as if it were the current state, until it lands on a supported
state.  ERROR in a non-ERROR row means "blocked": STOP_COPY -> PRE_COPY(_P2P) is refused.

Two modes reproduce the kernel's history:

* ``fixed`` (default): the skip loop stops at the ERROR sentinel and the request fails
  with EINVAL (the 2026 stable fix).
* ``error_sentinel_loop``: the pre-2026 loop, whose condition was only "hop not
  supported".  ERROR is never supported and ``TABLE[ERROR][*]`` is ERROR, so STOP_COPY ->
  PRE_COPY spins forever.  The model runs it under an iteration budget and reports the
  spin as :class:`~vmferry.errors.NonTermination` instead of hanging.

``ARCS`` lists every single-hop transition a driver can be asked to perform with its
session effect (uAPI FSM prose); the device core and the path-rule checks read it.
"""

from __future__ import annotations

import errno
from collections import deque
from enum import Enum
from typing import Final, Literal

from vmferry.errors import NonTermination
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.states import (
    DEVICE_STATE_NR,
    SAVING_STATES,
    DeviceState,
    MigrationFlags,
    supported,
)

S = DeviceState
FsmMode = Literal["fixed", "error_sentinel_loop"]
FSM_MODES: tuple[FsmMode, ...] = ("fixed", "error_sentinel_loop")

#: iteration budget of the faulty skip loop (the real chain is at most 3 skips long)
LOOP_BUDGET: Final = 16

_COLUMNS = (S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P, S.PRE_COPY,
            S.PRE_COPY_P2P, S.ERROR)  # fmt: skip

# cur -> first hop, per requested final state (columns in _COLUMNS order)
_ROWS: dict[DeviceState, tuple[DeviceState, ...]] = {
    S.STOP:         (S.STOP, S.RUNNING_P2P, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P,
                     S.RUNNING_P2P, S.RUNNING_P2P, S.ERROR),
    S.RUNNING:      (S.RUNNING_P2P, S.RUNNING, S.RUNNING_P2P, S.RUNNING_P2P, S.RUNNING_P2P,
                     S.PRE_COPY, S.RUNNING_P2P, S.ERROR),
    S.STOP_COPY:    (S.STOP, S.STOP, S.STOP_COPY, S.STOP, S.STOP, S.ERROR, S.ERROR, S.ERROR),
    S.RESUMING:     (S.STOP, S.STOP, S.STOP, S.RESUMING, S.STOP, S.STOP, S.STOP, S.ERROR),
    S.RUNNING_P2P:  (S.STOP, S.RUNNING, S.STOP, S.STOP, S.RUNNING_P2P, S.RUNNING,
                     S.PRE_COPY_P2P, S.ERROR),
    S.PRE_COPY:     (S.RUNNING, S.RUNNING, S.PRE_COPY_P2P, S.RUNNING, S.RUNNING, S.PRE_COPY,
                     S.PRE_COPY_P2P, S.ERROR),
    S.PRE_COPY_P2P: (S.RUNNING_P2P, S.RUNNING_P2P, S.STOP_COPY, S.RUNNING_P2P, S.RUNNING_P2P,
                     S.PRE_COPY, S.PRE_COPY_P2P, S.ERROR),
    S.ERROR:        (S.ERROR,) * 8,
}  # fmt: skip

#: The literal 8x8 next-hop table: TABLE[cur][new] -> first hop before skipping.
TABLE: Final[dict[DeviceState, dict[DeviceState, DeviceState]]] = {
    cur: dict(zip(_COLUMNS, row, strict=True)) for cur, row in _ROWS.items()
}


class Session(Enum):
    """What an arc does to the data-transfer session."""

    NONE = "none"
    OPEN_SAVING = "open-saving"
    OPEN_RESUMING = "open-resuming"
    CONTINUE = "continue"  # same session, P2P quiescence changes
    FINAL = "final"  # same saving session, now streaming the final state
    END_SAVING = "end-saving"
    END_RESUMING = "end-resuming"  # the driver validates and commits the loaded state


#: Every arc a driver may be asked to perform, with its session effect.
ARCS: Final[dict[tuple[DeviceState, DeviceState], Session]] = {
    (S.RUNNING, S.STOP): Session.NONE,
    (S.STOP, S.RUNNING): Session.NONE,
    (S.RUNNING, S.RUNNING_P2P): Session.NONE,
    (S.RUNNING_P2P, S.RUNNING): Session.NONE,
    (S.RUNNING_P2P, S.STOP): Session.NONE,
    (S.STOP, S.RUNNING_P2P): Session.NONE,
    (S.STOP, S.STOP_COPY): Session.OPEN_SAVING,
    (S.STOP_COPY, S.STOP): Session.END_SAVING,
    (S.STOP, S.RESUMING): Session.OPEN_RESUMING,
    (S.RESUMING, S.STOP): Session.END_RESUMING,
    (S.RUNNING, S.PRE_COPY): Session.OPEN_SAVING,
    (S.PRE_COPY, S.RUNNING): Session.END_SAVING,
    (S.RUNNING_P2P, S.PRE_COPY_P2P): Session.OPEN_SAVING,
    (S.PRE_COPY_P2P, S.RUNNING_P2P): Session.END_SAVING,
    (S.PRE_COPY, S.PRE_COPY_P2P): Session.CONTINUE,
    (S.PRE_COPY_P2P, S.PRE_COPY): Session.CONTINUE,
    (S.PRE_COPY_P2P, S.STOP_COPY): Session.FINAL,
    (S.PRE_COPY, S.STOP_COPY): Session.FINAL,
}


def _check_request(flags: int, cur: int, new: int) -> None:
    if not supported(cur, flags):
        raise VfioError(errno.EINVAL, f"current state {_name(cur)} unsupported by flags "
                        f"{flags:#x}", state=_state_or_none(cur))  # fmt: skip
    if not supported(new, flags):
        raise VfioError(errno.EINVAL, f"target {_name(new)} unsupported by flags {flags:#x}",
                        state=_state_or_none(cur))  # fmt: skip


def next_state(flags: int, cur: int, new: int, *, mode: FsmMode = "fixed") -> DeviceState:
    """One hop from ``cur`` towards ``new``.

    Raises VfioError(EINVAL) where the kernel returns -EINVAL, and NonTermination when the
    ``error_sentinel_loop`` mode spins past its budget.
    """
    _check_request(flags, cur, new)
    nxt = TABLE[S(cur)][S(new)]
    spins = 0
    while not supported(nxt, flags) and (mode == "error_sentinel_loop" or nxt != S.ERROR):
        spins += 1
        if spins > LOOP_BUDGET:
            raise NonTermination(
                f"vfio_mig_get_next_state spins at ERROR sentinel: {S(cur).name} -> "
                f"{S(new).name} with flags {flags:#x} ({spins} iterations)"
            )
        nxt = TABLE[nxt][S(new)]
    if nxt == S.ERROR:
        raise VfioError(errno.EINVAL, f"no arc {S(cur).name} -> {S(new).name}", state=S(cur))
    return nxt


def path(flags: int, cur: int, new: int, *, mode: FsmMode = "fixed") -> list[DeviceState]:
    """Every hop after ``cur`` ending with ``new``; ``[]`` when ``cur == new``."""
    _check_request(flags, cur, new)
    hops: list[DeviceState] = []
    at = S(cur)
    while at != new:
        at = next_state(flags, at, new, mode=mode)
        hops.append(at)
        if len(hops) > DEVICE_STATE_NR:
            raise NonTermination(f"path {S(cur).name} -> {S(new).name} does not converge")
    return hops


def states_for(flags: int) -> list[DeviceState]:
    """Supported states of a device with ``flags`` (ERROR excluded), in value order."""
    return [s for s in DeviceState if supported(s, flags)]


def arcs_for(flags: int) -> list[tuple[DeviceState, DeviceState]]:
    """The arcs a driver with ``flags`` must implement: every first hop the table yields."""
    found: set[tuple[DeviceState, DeviceState]] = set()
    for cur in states_for(flags):
        for new in states_for(flags):
            if cur == new:
                continue
            try:
                found.add((cur, next_state(flags, cur, new)))
            except VfioError:
                continue
    return sorted(found)


def _name(value: int) -> str:
    return S(value).name if 0 <= value < DEVICE_STATE_NR else str(value)


def _state_or_none(value: int) -> DeviceState | None:
    return S(value) if 0 <= value < DEVICE_STATE_NR else None


# --- the uAPI's path rules, checked against the table ------------------------------------


def _intermediate_ok(start: DeviceState, before: list[DeviceState], hop: DeviceState) -> bool:
    """uAPI: RESUMING is never intermediate; a saving state is intermediate only when
    the path started inside the saving group and has not left it."""
    if hop == S.RESUMING:
        return False
    if hop in SAVING_STATES:
        return start in SAVING_STATES and all(h in SAVING_STATES for h in before)
    return True


def shortest_allowed(flags: int, cur: DeviceState, new: DeviceState) -> int | None:
    """Length of the shortest arc path the rules allow (BFS), or None if unreachable."""
    arcs = arcs_for(flags)
    queue: deque[tuple[DeviceState, list[DeviceState]]] = deque([(cur, [])])
    seen = {cur}
    while queue:
        at, hops = queue.popleft()
        for a, b in arcs:
            if a != at or b in seen:
                continue
            if b == new:
                return len(hops) + 1
            if _intermediate_ok(cur, hops, b):
                seen.add(b)
                queue.append((b, [*hops, b]))
    return None


def path_rule_violations(
    flags: int, cur: DeviceState, new: DeviceState, hops: list[DeviceState]
) -> list[str]:
    """Which of the uAPI path rules ``hops`` (a path cur -> new) breaks; [] if none."""
    bad: list[str] = []
    if hops and (shortest := shortest_allowed(flags, cur, new)) is not None \
            and len(hops) != shortest:  # fmt: skip
        bad.append(f"not shortest: {len(hops)} hops, {shortest} possible")
    for i, hop in enumerate(hops[:-1]):
        if hop == S.RESUMING:
            bad.append("RESUMING used as an intermediate hop")
        elif hop in SAVING_STATES and not _intermediate_ok(cur, hops[:i], hop):
            bad.append(f"saving state {hop.name} entered mid-path")
    prev = cur
    for i, hop in enumerate(hops):
        effect = ARCS.get((prev, hop))
        if effect is None:
            bad.append(f"{prev.name} -> {hop.name} is not an arc")
        elif effect in (Session.OPEN_SAVING, Session.OPEN_RESUMING) and i != len(hops) - 1:
            bad.append(f"intermediate hop {prev.name} -> {hop.name} opens a data session")
        prev = hop
    return bad


def dot_graph(flags: int) -> str:
    """Graphviz source of the arc graph for ``flags``, generated from ``TABLE``/``ARCS``."""
    label = "|".join(f.name or "" for f in MigrationFlags if f & flags)
    lines = [f'digraph "vfio_{flags:#x}" {{', f'  label="{label}";', "  rankdir=LR;"]
    lines += [f"  {s.name};" for s in states_for(flags)]
    for a, b in arcs_for(flags):
        effect = ARCS[(a, b)]
        attr = "" if effect is Session.NONE else f' [label="{effect.value}"]'
        lines.append(f"  {a.name} -> {b.name}{attr};")
    lines.append("}")
    return "\n".join(lines) + "\n"
