"""Assertion helpers for tests of explorer reports.

An explorer report lists failing schedules, each classified by the hazard it hit
(``use-after-free``, ``null-deref``, ``invariant-violation``, ...).  A model that crashes
with an exception the model does not define is classified ``"exception"``: that is a bug in
the model, never the hazard a faulty mode is meant to reproduce.  A test that only asserts
"there were failures" would accept such a crash; these helpers check what failed.

The helpers take any object with a ``failures`` list whose items have ``hazard`` and
``message`` attributes (``vmferry.analysis.explore.Report`` and its ``Failure``), so this
module needs nothing from the analysis layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

#: the classification of an exception the model does not define (a crash, not a hazard)
UNCLASSIFIED = "exception"


class FailureLike(Protocol):
    @property
    def hazard(self) -> str: ...

    @property
    def message(self) -> str: ...


class ReportLike(Protocol):
    @property
    def failures(self) -> Sequence[FailureLike]: ...


def assert_hazard(report: ReportLike, hazard: str, fragment: str = "") -> FailureLike:
    """The first failure of kind ``hazard`` whose message contains ``fragment``.

    Raises AssertionError when there is none, and when any failure of the report is an
    unclassified model crash (hazard ``"exception"``), listing what the report holds.
    """
    kinds = [(f.hazard, f.message) for f in report.failures]
    crashes = [m for h, m in kinds if h == UNCLASSIFIED]
    if crashes:
        raise AssertionError(f"the model crashed (classified {UNCLASSIFIED!r}): {crashes[0]}")
    for failure in report.failures:
        if failure.hazard == hazard and fragment in failure.message:
            return failure
    raise AssertionError(f"no {hazard!r} failure mentioning {fragment!r}; report has {kinds}")


def assert_no_failures(report: ReportLike) -> None:
    """Raise AssertionError naming the first failure, if the report has any."""
    if report.failures:
        first = report.failures[0]
        raise AssertionError(f"{len(report.failures)} failures, first {first.hazard}: "
                             f"{first.message}")
