"""What a finished migration job means for its operator, in words and as an exit code.

A job's ``status`` says whether the VM moved.  It does not say whether it arrived whole:
work the destination does after the commit point (the pseries device-tree update, the
TCE table rebuild, the arm64 register merge) cannot give the VM back to the source, so a
problem there leaves a ``completed`` job whose ``destination_report`` names it.  This
module reads a job's JSON and answers three questions the CLI, the events and the charts
share:

* :func:`destination_problems` -- what went wrong on the destination, one sentence each;
* :func:`downtime_overrun` -- the warning for a downtime above its limit;
* :func:`verdict` -- the exit code (:class:`Exit`) and the lines to print.

Exit codes (``vmferry migrate``, ``job watch``)::

    0  completed, nothing reported
    1  failed or cancelled: the VM stays on the source host
    3  completed, but the destination reported a problem (the VM runs there)
    130 interrupted: the operator detached (Ctrl-C twice), the job goes on
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1
    DESTINATION_PROBLEM = 3
    INTERRUPTED = 130


def destination_problems(stats: Mapping[str, Any]) -> list[str]:
    """One sentence per problem the destination reported after the commit point."""
    report = stats.get("destination_report") or {}
    out: list[str] = []
    for name, rep in sorted(report.items()):
        if isinstance(rep, Mapping):
            out += [f"{name}: {p}" for p in _handler_problems(rep)]
    if stats.get("destination_ok") is False and not out:
        failed = sorted(k for k, r in report.items()
                        if isinstance(r, Mapping) and r.get("ok") is False)
        out.append(f"post-load work failed on the destination ({', '.join(failed) or '?'})")
    return out


def _handler_problems(rep: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for h in rep.get("hazards") or []:
        if isinstance(h, Mapping):
            where = h.get("node") or h.get("path") or ""
            out.append(f"hazard {h.get('hazard', '?')}" + (f" at {where}" if where else ""))
    for leak in rep.get("leaks") or []:
        if isinstance(leak, Mapping):
            out.append(f"reference leak on {leak.get('node', '?')} "
                       f"(refcount {leak.get('refcount', '?')}, {leak.get('state', '?')})")
    out += [f"error: {e}" for e in rep.get("errors") or []]
    check = rep.get("tree_check")
    if isinstance(check, list) and check:
        out.append(f"device tree check failed: {'; '.join(str(c) for c in check[:3])}")
    elif isinstance(check, str) and check != "ok":
        out.append(f"device tree check failed: {check}")
    if rep.get("matches_destination") is False:
        out.append("device tree does not match the destination's description")
    rebuild = rep.get("rebuild")
    if isinstance(rebuild, Mapping) and rebuild.get("cleared"):
        out.append(f"{rebuild['cleared']} TCE entries dropped (the destination cannot back "
                   "them; device DMA to them faults)")
    invariants = rep.get("invariants")
    if isinstance(invariants, str) and invariants != "ok":
        out.append(f"IOMMU invariants broken: {invariants}")
    load = rep.get("load")
    if isinstance(load, Mapping) and load.get("dropped"):
        regs = ", ".join(sorted(load["dropped"]))
        out.append(f"firmware registers dropped by the destination kernel: {regs}")
    if rep.get("ok") is False and not out:
        out.append("reported not ok")
    return out


def downtime_overrun(stats: Mapping[str, Any], limit_ms: float | None) -> str | None:
    """The warning for a completed job whose downtime exceeded its limit, else None."""
    if limit_ms is None or stats.get("status") != "completed":
        return None
    downtime = float(stats.get("downtime", 0.0))
    if downtime <= limit_ms:
        return None
    msg = f"downtime {downtime:.1f} ms exceeded the limit of {limit_ms:g} ms"
    breakdown = stats.get("downtime-breakdown")
    verify_ms = breakdown.get("verification_ms", 0.0) if isinstance(breakdown, Mapping) else 0.0
    if isinstance(verify_ms, int | float) and verify_ms > 0:
        msg += f" (verification took {verify_ms:.1f} ms of it)"
    return msg


def downtime_limit(job: Mapping[str, Any]) -> float | None:
    """The downtime limit a job ran with, in ms (its latest value if changed live)."""
    value = (job.get("params") or {}).get("downtime_limit_ms")
    return float(value) if isinstance(value, int | float) else None


@dataclass
class Verdict:
    code: Exit
    headline: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def verdict(job: Mapping[str, Any]) -> Verdict:
    """The exit code and the words for a finished job (source or destination side)."""
    stats = job.get("stats") or {}
    status = job.get("status")
    warnings = [str(w) for w in stats.get("warnings", [])]
    overrun = downtime_overrun(stats, downtime_limit(job))
    if overrun and overrun not in warnings:
        warnings.append(overrun)
    if status != "completed":
        where = job.get("step") or "?"
        return Verdict(Exit.FAILED, f"{status} at {where}: {job.get('error') or 'no reason'}",
                       warnings=warnings)
    problems = destination_problems(stats)
    if problems:
        return Verdict(Exit.DESTINATION_PROBLEM,
                       "completed, but the destination reported problems", problems, warnings)
    return Verdict(Exit.OK, "completed", warnings=warnings)
