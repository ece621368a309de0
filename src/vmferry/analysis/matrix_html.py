"""The matrix as a coloured source x destination grid per guest PSCI setting (HTML).

Each grid cell gathers the cells of every host-mitigation pair for one (source,
destination, guest PSCI): its colour is the worst outcome among them (:data:`SEVERITY`),
its text names each distinct outcome with the mitigation pairs it applies to and the
reason.  The page is rendered from ``templates/matrix.html.j2`` with jinja2 (autoescaped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import jinja2

from vmferry.analysis.matrix import MITIGATIONS, OUTCOMES, SHORT, Cell, summary

#: outcome -> fill colour of its cells and legend swatch
COLOURS: Final = {
    "migrates": "#8fd18f",
    "degraded": "#f2d36b",
    "refused": "#8fb8e8",
    "fails_after_stop": "#e88080",
}
LABELS: Final = {
    "migrates": "migrates",
    "degraded": "silently degraded",
    "refused": "refused at pre-flight",
    "fails_after_stop": "fails after the source stopped",
}
#: worst first: the colour a grid cell takes when its mitigation pairs disagree
SEVERITY: Final = ("fails_after_stop", "degraded", "refused", "migrates")

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("vmferry.analysis", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass
class GridCell:
    outcome: str
    reasons: list[str] = field(default_factory=list)
    #: (mitigation pair, its outcome), one chip each in the cell
    chips: list[tuple[str, str]] = field(default_factory=list)

    @property
    def title(self) -> str:
        return "\n".join(self.reasons)


@dataclass
class Grid:
    psci: str
    sources: list[str]
    destinations: list[str]
    cells: dict[tuple[str, str], GridCell]


def _pair(c: Cell) -> str:
    return (f"{SHORT.get(c.source_mitigation, c.source_mitigation)}->"
            f"{SHORT.get(c.destination_mitigation, c.destination_mitigation)}")


def _grid_cell(members: Sequence[Cell]) -> GridCell:
    by_reason: dict[tuple[str, str], list[str]] = {}
    for c in members:
        by_reason.setdefault((c.outcome, c.reason), []).append(_pair(c))
    outcome = min((c.outcome for c in members), key=SEVERITY.index)
    reasons = []
    for (o, reason), pairs in sorted(by_reason.items(), key=lambda kv: SEVERITY.index(kv[0][0])):
        which = "all mitigations" if len(pairs) == len(MITIGATIONS) ** 2 else ", ".join(pairs)
        reasons.append(f"{LABELS[o]} ({which}): {reason}")
    return GridCell(outcome, reasons, [(_pair(c), c.outcome) for c in members])


def grids(cells: Sequence[Cell]) -> list[Grid]:
    out: list[Grid] = []
    for psci in dict.fromkeys(c.guest_psci for c in cells):
        members = [c for c in cells if c.guest_psci == psci]
        groups: dict[tuple[str, str], list[Cell]] = {}
        for c in members:
            groups.setdefault((c.source, c.destination), []).append(c)
        out.append(Grid(
            psci,
            list(dict.fromkeys(c.source for c in members)),
            list(dict.fromkeys(c.destination for c in members)),
            {k: _grid_cell(v) for k, v in groups.items()},
        ))
    return out


def to_html(cells: Sequence[Cell]) -> str:
    """The whole page."""
    context: dict[str, Any] = {
        "compat": ", ".join(sorted({c.compat for c in cells})),
        "colours": {o: COLOURS[o] for o in OUTCOMES},
        "labels": LABELS,
        "counts": summary(cells),
        "grids": grids(cells),
    }
    return _ENV.get_template("matrix.html.j2").render(context)
