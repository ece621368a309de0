"""A guest workload that dirties memory at a configured rate and pattern.

It gives pre-copy something to chase.  Time is whatever the caller says it is: the host
calls :meth:`Workload.run` with the guest time that passed, so the same workload runs in
real time under a daemon and in simulated time in tests.

Patterns (``WorkloadSpec.pattern``):

* ``uniform``    -- every page equally likely;
* ``hot``        -- ``hot_weight`` of the writes land in a hot set of ``hot_fraction`` of
  RAM (a skewed working set: the realistic case where pre-copy converges);
* ``sequential`` -- a cursor sweeps RAM and wraps (the worst case for pre-copy).

Each dirtied page gets one fresh 64-bit value at a moving offset, so the page really
changes and a migration that lost it is caught by the RAM digest.  Rates are in MB/s of
dirtied pages (10**6 bytes a second), scaled down by the auto-converge throttle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vmferry.errors import ConfigError

PATTERNS = ("uniform", "hot", "sequential")
MAX_THROTTLE_PCT = 99


class PageWriter(Protocol):
    npages: int
    page_size: int

    def poke_words(
        self, index: npt.NDArray[np.int64], word: int, values: npt.NDArray[np.uint64]
    ) -> None: ...


@dataclass(frozen=True)
class WorkloadSpec:
    dirty_rate_mbps: float = 0.0
    pattern: str = "hot"
    hot_fraction: float = 0.1
    hot_weight: float = 0.9
    seed: int = 1

    def __post_init__(self) -> None:
        if self.dirty_rate_mbps < 0:
            raise ConfigError(f"workload dirty_rate_mbps must be >= 0, not {self.dirty_rate_mbps}")
        if self.pattern not in PATTERNS:
            raise ConfigError(f"workload pattern {self.pattern!r} is not one of {PATTERNS}")
        if not 0 < self.hot_fraction <= 1 or not 0 <= self.hot_weight <= 1:
            raise ConfigError("workload hot_fraction must be in (0, 1], hot_weight in [0, 1]")

    @classmethod
    def from_definition(cls, d: Mapping[str, object] | None) -> WorkloadSpec:
        if d is None:
            return cls()
        known = {"dirty_rate_mbps", "pattern", "hot_fraction", "hot_weight", "seed"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown workload keys: {sorted(unknown)}")
        try:
            return cls(
                dirty_rate_mbps=float(d.get("dirty_rate_mbps", 0.0)),  # type: ignore[arg-type]
                pattern=str(d.get("pattern", "hot")),
                hot_fraction=float(d.get("hot_fraction", 0.1)),  # type: ignore[arg-type]
                hot_weight=float(d.get("hot_weight", 0.9)),  # type: ignore[arg-type]
                seed=int(d.get("seed", 1)),  # type: ignore[call-overload]
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad workload definition: {exc}") from exc

    def to_definition(self) -> dict[str, object]:
        return {
            "dirty_rate_mbps": self.dirty_rate_mbps,
            "pattern": self.pattern,
            "hot_fraction": self.hot_fraction,
            "hot_weight": self.hot_weight,
            "seed": self.seed,
        }


class Workload:
    """Dirties pages of ``memory`` as guest time passes."""

    def __init__(self, spec: WorkloadSpec, memory: PageWriter) -> None:
        self.spec = spec
        self.memory = memory
        self.throttle_pct = 0
        self.pages_written = 0
        self._rng = np.random.default_rng(spec.seed)
        self._carry = 0.0
        self._cursor = 0
        self._generation = 0
        hot = max(1, int(memory.npages * spec.hot_fraction))
        self._hot_pages = min(hot, memory.npages)

    def set_throttle(self, pct: int) -> None:
        """Auto-converge: the guest runs only ``100 - pct`` percent of the time."""
        self.throttle_pct = max(0, min(MAX_THROTTLE_PCT, pct))

    @property
    def effective_rate_mbps(self) -> float:
        return self.spec.dirty_rate_mbps * (100 - self.throttle_pct) / 100

    def run(self, seconds: float) -> int:
        """Dirty what ``seconds`` of guest time dirties; returns the pages written."""
        if seconds <= 0 or self.spec.dirty_rate_mbps == 0:
            return 0
        self._carry += self.effective_rate_mbps * 1e6 * seconds / self.memory.page_size
        count = min(int(self._carry), self.memory.npages)
        self._carry -= count
        if count == 0:
            return 0
        index = self._choose(count)
        self._generation += 1
        values = self._rng.integers(1, 2**63, size=index.size, dtype=np.uint64)
        word = self._generation % (self.memory.page_size // 8)
        self.memory.poke_words(index, word, values)
        self.pages_written += int(index.size)
        return int(index.size)

    def _choose(self, count: int) -> npt.NDArray[np.int64]:
        n = self.memory.npages
        if self.spec.pattern == "sequential":
            index = (self._cursor + np.arange(count, dtype=np.int64)) % n
            self._cursor = int((self._cursor + count) % n)
            return index
        if self.spec.pattern == "uniform":
            return self._rng.integers(0, n, size=count, dtype=np.int64)
        hot = self._rng.random(count) < self.spec.hot_weight
        index = self._rng.integers(0, n, size=count, dtype=np.int64)
        index[hot] = self._rng.integers(0, self._hot_pages, size=int(hot.sum()), dtype=np.int64)
        return index
