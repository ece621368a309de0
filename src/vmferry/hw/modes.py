"""Correct and faulty modes of the executable models, declared one way for all of them.

Theory of operation
-------------------
Each model (VFIO migration, arm64 firmware registers, sPAPR TCE, pseries LPM, IOMMU
probe) declares its :class:`Switch` es -- one per historical or upstream behaviour it can
reproduce, with the hazard it causes -- and its presets: named sets of switches (the
designs, kernel releases or single faults the docs talk about).  A mode is written as a
preset optionally followed by ``+switch`` terms (``upstream+no_pf_skip``,
``v6_15+relock_no_recheck``); :meth:`Modes.parse` turns it into a :class:`Mode`, the set of
switches that are on.  How a switch changes the model stays with the model (a flag it
reads, an option it overrides); only the naming, composition and validation live here.

An unknown preset or switch is a :class:`UnknownMode` naming the model and what it knows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vmferry.errors import ConfigError


class UnknownMode(ConfigError):
    """A mode names a preset or switch the model does not have."""


@dataclass(frozen=True, slots=True)
class Switch:
    """One behaviour a model can reproduce: what it does and the hazard it causes."""

    name: str
    behaviour: str
    hazard: str = ""


@dataclass(frozen=True, slots=True)
class Mode:
    """A parsed mode: its text and the switches that are on."""

    model: str
    name: str
    switches: frozenset[str]

    def __contains__(self, switch: object) -> bool:
        return switch in self.switches

    @property
    def faulty(self) -> bool:
        return bool(self.switches)


class Modes:
    """A model's switches and presets; :meth:`parse` reads ``preset[+switch...]``."""

    def __init__(self, model: str, switches: Iterable[Switch],
                 presets: Mapping[str, Iterable[str]], default: str) -> None:
        self.model = model
        self.switches: dict[str, Switch] = {s.name: s for s in switches}
        self.presets: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in presets.items()}
        for preset, on in self.presets.items():
            unknown = on - set(self.switches)
            if unknown:
                raise ValueError(f"{model} preset {preset!r} names unknown {sorted(unknown)}")
        if default not in self.presets:
            raise ValueError(f"{model}: default {default!r} is not a preset")
        self.default = default

    def parse(self, text: str) -> Mode:
        """``preset[+switch...]`` -> :class:`Mode`; :class:`UnknownMode` for unknown names."""
        preset, *extra = text.split("+")
        base = self.presets.get(preset)
        if base is None:
            raise UnknownMode(f"unknown {self.model} mode {preset!r}; presets: "
                              f"{', '.join(self.presets)}")
        unknown = [s for s in extra if s not in self.switches]
        if unknown:
            raise UnknownMode(f"unknown {self.model} switch(es) {', '.join(unknown)}; "
                              f"switches: {', '.join(self.switches)}")
        return Mode(self.model, text, base | frozenset(extra))

    def names(self) -> tuple[str, ...]:
        """The presets, default first."""
        return (self.default, *(p for p in self.presets if p != self.default))

    def describe(self, text: str) -> str:
        """One line per switch of ``text`` (or that it is the correct mode)."""
        mode = self.parse(text)
        if not mode.switches:
            return "correct: no faulty switch"
        return "; ".join(f"{self.switches[s].behaviour}"
                         + (f" ({self.switches[s].hazard})" if self.switches[s].hazard else "")
                         for s in sorted(mode.switches))
