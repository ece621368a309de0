"""Failures, reports and replay scripts.

A failing schedule is saved as a short text script that names the scenario, mode and case
(or ``-`` for ad-hoc programs) and lists the steps, one thread choice per line::

    vmferry-explore-replay 1
    scenario iommu-probe
    mode pre_6_7
    case R1
    hazard null-deref
    message NullDeref: fwspec install through D.iommu == NULL
    step C start
    step W lock probe_lock
    steps 12 S spin
    repeat 5
      step A read owner
      step A verify owner
    end

``steps N T label`` stands for N identical consecutive steps, ``repeat N`` ... ``end`` for
N repetitions of the block of steps between them.  A label that parsing would not keep as
it is (leading or trailing whitespace, a control character, a leading double quote) is
written as a JSON string: ``step mobility "of_node_get "``.  The label after the thread
name is checked on replay: a script that no longer fits the model is rejected with a
:class:`~vmferry.analysis.explore.engine.ScheduleMismatch` naming the step.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.analysis.explore.engine import Step

SCRIPT_MAGIC = "vmferry-explore-replay 1"
AD_HOC = "-"
_HEADER_KEYS = ("scenario", "mode", "case", "hazard", "message")


class ReplayScriptError(ValueError):
    """A replay script is malformed (names the line)."""


@dataclass(frozen=True)
class Failure:
    """One failing schedule."""

    case: str
    hazard: str
    message: str
    schedule: tuple[Step, ...]
    scenario: str = AD_HOC
    mode: str = AD_HOC
    #: thread that raised, or None (invariant, final check, deadlock, step budget)
    thread: str | None = None
    #: where the script was saved, if it was
    path: str | None = None

    def script(self) -> str:
        """The replay script (see the module docstring)."""
        lines = [SCRIPT_MAGIC]
        header = (self.scenario, self.mode, self.case, self.hazard, _one_line(self.message))
        lines += [f"{key} {value}" for key, value in zip(_HEADER_KEYS, header, strict=True)]
        lines += _step_lines(self.schedule)
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "hazard": self.hazard,
            "message": self.message,
            "thread": self.thread,
            "schedule": [list(step) for step in self.schedule],
            "script": self.script(),
            "path": self.path,
        }

    def key(self) -> tuple[str, str, str]:
        """Identity for de-duplication: heap serials (``obj#123``) do not count."""
        return (self.case, self.hazard, re.sub(r"#\d+", "#N", self.message))

    def file_name(self) -> str:
        digest = hashlib.sha1(self.script().encode()).hexdigest()[:10]
        return f"{_slug(self.scenario)}-{_slug(self.mode)}-{_slug(self.case)}-{digest}.replay"


@dataclass
class Report:
    """What one exploration found."""

    scenario: str
    mode: str
    strategy: str
    schedules_explored: int = 0
    #: runs cut short (sleep-set blocked or a state explored before) ...
    pruned: int = 0
    #: ... of which by state hashing
    pruned_by_state: int = 0
    failures: list[Failure] = field(default_factory=list)
    #: failing schedules in total (``failures`` keeps one per distinct case/hazard/message)
    failing_schedules: int = 0
    elapsed_s: float = 0.0
    #: the whole bounded space was explored (exhaustive, not cut by max_schedules)
    complete: bool = True
    preemption_bound: int | None = None
    seed: int = 0
    cases: list[str] = field(default_factory=list)
    #: the mode's hazard fails on every schedule (not a race)
    deterministic: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "mode": self.mode,
            "strategy": self.strategy,
            "cases": list(self.cases),
            "preemption_bound": self.preemption_bound,
            "seed": self.seed,
            "schedules_explored": self.schedules_explored,
            "pruned": self.pruned,
            "pruned_by_state": self.pruned_by_state,
            "failing_schedules": self.failing_schedules,
            "deterministic": self.deterministic,
            "failures": [f.to_json() for f in self.failures],
            "elapsed_s": round(self.elapsed_s, 6),
            "complete": self.complete,
        }


@dataclass(frozen=True)
class ParsedScript:
    scenario: str
    mode: str
    case: str
    hazard: str
    message: str
    schedule: tuple[Step, ...]


def parse_script(text: str) -> ParsedScript:
    """Parse a replay script; raises ReplayScriptError naming the offending line."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines or lines[0].strip() != SCRIPT_MAGIC:
        raise ReplayScriptError(f"line 1: expected {SCRIPT_MAGIC!r}")
    header: dict[str, str] = {}
    steps: list[Step] = []
    block: list[Step] | None = None
    reps = 0
    for number, line in enumerate(lines[1:], start=2):
        word, _, rest = line.strip().partition(" ")
        target = steps if block is None else block
        if word in _HEADER_KEYS and not steps and block is None:
            header[word] = rest
        elif word == "step":
            target.append(_parse_step(rest, number))
        elif word == "steps":
            count, _, rest = rest.partition(" ")
            target.extend([_parse_step(rest, number)] * _count(count, number))
        elif word == "repeat" and block is None:
            block, reps = [], _count(rest, number)
        elif word == "end" and block is not None:
            steps.extend(block * reps)
            block = None
        else:
            raise ReplayScriptError(f"line {number}: unexpected {word!r}")
    if block is not None:
        raise ReplayScriptError("a repeat block is not closed by 'end'")
    missing = [key for key in _HEADER_KEYS if key not in header]
    if missing:
        raise ReplayScriptError(f"missing header field(s): {', '.join(missing)}")
    return ParsedScript(
        header["scenario"], header["mode"], header["case"], header["hazard"],
        header["message"], tuple(steps),
    )


def read_script(script_or_path: str | Path) -> ParsedScript:
    """Accept either the text of a script or a path to one."""
    if isinstance(script_or_path, str) and script_or_path.startswith(SCRIPT_MAGIC):
        return parse_script(script_or_path)
    path = Path(script_or_path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ReplayScriptError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_script(text)


def save_failure(failure: Failure, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / failure.file_name()
    path.write_text(failure.script())
    return path


def _count(text: str, number: int) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ReplayScriptError(f"line {number}: bad repeat count {text!r}")
    return int(text)


def _parse_step(rest: str, number: int) -> Step:
    name, _, label = rest.partition(" ")
    if not name or not label:
        raise ReplayScriptError(f"line {number}: a step needs a thread and a label")
    if label.startswith('"'):
        try:
            decoded = json.loads(label)
        except ValueError as exc:
            raise ReplayScriptError(f"line {number}: bad quoted label {label!r}") from exc
        if not isinstance(decoded, str):
            raise ReplayScriptError(f"line {number}: bad quoted label {label!r}")
        label = decoded
    return (name, label)


def encode_label(label: str) -> str:
    """``label`` as a script writes it: as is, or JSON-quoted when parsing would change it."""
    plain = (
        label
        and label == label.strip()
        and not label.startswith('"')
        and label.isprintable()
    )
    return label if plain else json.dumps(label)


def _step_lines(schedule: tuple[Step, ...]) -> list[str]:
    """Fold runs of a repeated block of up to ``_MAX_PERIOD`` steps."""
    out: list[str] = []
    i = 0
    while i < len(schedule):
        period, reps = _best_period(schedule, i)
        block = [f"step {name} {encode_label(label)}" for name, label in schedule[i : i + period]]
        if reps == 1:
            out += block
        elif period == 1:
            out.append(f"steps {reps} {block[0][5:]}")
        else:
            out += [f"repeat {reps}", *("  " + line for line in block), "end"]
        i += period * reps
    return out


_MAX_PERIOD = 8


def _best_period(schedule: tuple[Step, ...], i: int) -> tuple[int, int]:
    best = (1, 1)
    for period in range(1, _MAX_PERIOD + 1):
        block = schedule[i : i + period]
        if len(block) < period:
            break
        reps = 1
        while schedule[i + reps * period : i + (reps + 1) * period] == block:
            reps += 1
        if reps > 1 and period * reps > best[0] * best[1]:
            best = (period, reps)
    return best


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"
