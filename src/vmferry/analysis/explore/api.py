"""What a scenario for the interleaving explorer is made of.

A *scenario* (``tce-indirect``, ``lpm-update``, ...) groups *cases*; each case builds a
fresh :class:`Instance` for a given *mode* (a model configuration such as ``double_read``
or the correct default).  An instance is a set of named threads -- plain callables that
run model code, which marks its shared accesses with :func:`vmferry.sync.yield_point` and
takes :class:`vmferry.sync.ModelLock` locks -- plus the checks the explorer applies.

Hazards are reported by raising :class:`vmferry.errors.HazardError` subclasses (from the
model itself, from ``invariant`` after any step, or from ``check`` once all threads end);
a plain ``AssertionError`` in a thread or check is reported as an assertion failure.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field


def _nothing() -> None:
    return None


@dataclass
class Instance:
    """One runnable configuration: threads over a freshly built shared model."""

    threads: Mapping[str, Callable[[], None]]
    #: run after every scheduling step; raise HazardError/AssertionError on a violation
    invariant: Callable[[], None] = _nothing
    #: run once when every thread has finished
    check: Callable[[], None] = _nothing
    #: a hashable digest of the shared state, for state-hash pruning (None: no pruning)
    state: Callable[[], Hashable] | None = None
    #: the objects ``state`` digests, when it is ``fingerprint`` of them: the explorer
    #: then digests them and the threads' suspended frames in one walk, so that a frame
    #: local pointing into the shared model costs a reference, not a second walk of it
    roots: tuple[object, ...] = ()
    #: the access of each thread's first step (its code before its first yield point), as
    #: ``yield_point`` declares one (an object, ``vmferry.sync.Accesses``, ``LOCAL``); a
    #: thread not listed touches everything there
    starts: Mapping[str, Hashable] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """A sub-case of a scenario (for example one race R0..R5 of the IOMMU probe)."""

    name: str
    description: str
    build: Callable[[str], Instance]
    #: modes in which this case must produce at least one failing schedule
    fails_in: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    modes: tuple[str, ...]
    default_mode: str
    cases: tuple[Case, ...]
    #: short description of each mode, shown by ``explore races --list``
    mode_help: Mapping[str, str] = field(default_factory=dict)
    preemption_bound: int | None = None
    max_steps: int = 10_000
    #: faulty modes whose hazard is not a race: every schedule fails (a lifetime bug that
    #: no interleaving avoids); reported as ``"deterministic": true``
    deterministic: frozenset[str] = frozenset()
    #: ``dpor`` hashes states (stateful DPOR) on this scenario; off where a state key
    #: costs more than the runs it saves (a large model walked at every node)
    dpor_state_hashing: bool = False

    def __post_init__(self) -> None:
        if self.default_mode not in self.modes:
            raise ValueError(f"{self.name}: default mode {self.default_mode!r} not in modes")
        if not self.deterministic <= set(self.modes):
            raise ValueError(f"{self.name}: deterministic modes {sorted(self.deterministic)}")
