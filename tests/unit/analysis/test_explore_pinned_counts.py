"""Issue 15 item 6: the explorer's searches count exactly as before they were made faster.

The throughput work (replaying the common prefix of schedules without checks, cheaper
steps) must not change what a search explores: for every scenario, its correct mode and
one faulty mode, and every strategy at preemption bound 1, the number of schedules, of
pruned runs (by state), of failing schedules and a digest of the failing schedules (their
kinds and steps) are pinned to what the search gave before that work.  Stateful searches
of ``lpm-update`` and ``tce-indirect`` are left out: their state keys make them slow.
"""

from __future__ import annotations

import hashlib

import pytest

from vmferry.analysis.explore.dpor import search
from vmferry.analysis.explore.engine import SearchLimits, classify
from vmferry.analysis.explore.scenarios import all_scenarios

#: strategy -> (reduction, state hashing)
STRATEGIES = {"naive": ("none", False), "sleep": ("sleep", False), "sleep+state": ("sleep", True),
              "dpor": ("dpor", False), "dpor+state": ("dpor", True)}

#: scenario, case, mode, strategy, schedules, pruned, pruned by state, failing schedules,
#: digest of the failing schedules.  The switchover's stateful rows were re-pinned once its
#: yield points stopped passing ``id()`` values (a suspended frame's locals are in the
#: state key: a raw address made equal states match only when memory was reused, and the
#: counts varied with the process -- 154 against 155 schedules in one CI run)
PINNED = [  # one row per line
    ('dirty-log', 'one-write', 'correct', 'naive', 9, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('dirty-log', 'one-write', 'correct', 'sleep', 9, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('dirty-log', 'one-write', 'correct', 'sleep+state', 9, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('dirty-log', 'one-write', 'correct', 'dpor', 9, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('dirty-log', 'one-write', 'correct', 'dpor+state', 9, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('dirty-log', 'one-write', 'copy_then_clear', 'naive', 7, 0, 0, 1, '7e5f59eda1aea3e9'),
    ('dirty-log', 'one-write', 'copy_then_clear', 'sleep', 7, 0, 0, 1, '7e5f59eda1aea3e9'),
    ('dirty-log', 'one-write', 'copy_then_clear', 'sleep+state', 7, 0, 0, 1, '7e5f59eda1aea3e9'),
    ('dirty-log', 'one-write', 'copy_then_clear', 'dpor', 7, 0, 0, 1, '7e5f59eda1aea3e9'),
    ('dirty-log', 'one-write', 'copy_then_clear', 'dpor+state', 7, 0, 0, 1, '7e5f59eda1aea3e9'),
    ('iommu-probe', 'R0', 'v6_15', 'naive', 72, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('iommu-probe', 'R0', 'v6_15', 'sleep', 72, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('iommu-probe', 'R0', 'v6_15', 'sleep+state', 16, 56, 56, 0, 'e3b0c44298fc1c14'),
    ('iommu-probe', 'R0', 'v6_15', 'dpor', 72, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('iommu-probe', 'R0', 'v6_15', 'dpor+state', 16, 56, 56, 0, 'e3b0c44298fc1c14'),
    ('iommu-probe', 'R3', 'global_lock', 'naive', 36, 0, 0, 7, '20e6fe216fc64045'),
    ('iommu-probe', 'R3', 'global_lock', 'sleep', 36, 0, 0, 7, '20e6fe216fc64045'),
    ('iommu-probe', 'R3', 'global_lock', 'sleep+state', 10, 26, 26, 4, 'ef569c5290557cde'),
    ('iommu-probe', 'R3', 'global_lock', 'dpor', 36, 0, 0, 7, '20e6fe216fc64045'),
    ('iommu-probe', 'R3', 'global_lock', 'dpor+state', 10, 26, 26, 4, 'ef569c5290557cde'),
    ('lpm-update', 'devspec-boot', 'correct', 'naive', 114, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('lpm-update', 'devspec-boot', 'correct', 'sleep', 114, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('lpm-update', 'devspec-boot', 'correct', 'dpor', 114, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('lpm-update', 'devspec-boot', 'upstream', 'naive', 114, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('lpm-update', 'devspec-boot', 'upstream', 'sleep', 114, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('lpm-update', 'devspec-boot', 'upstream', 'dpor', 114, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('switchover', 'clean', 'correct', 'naive', 330, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('switchover', 'clean', 'correct', 'sleep', 330, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('switchover', 'clean', 'correct', 'sleep+state', 122, 122, 122, 0, 'e3b0c44298fc1c14'),
    ('switchover', 'clean', 'correct', 'dpor', 330, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('switchover', 'clean', 'correct', 'dpor+state', 122, 122, 122, 0, 'e3b0c44298fc1c14'),
    ('switchover', 'clean', 'resume_after_silent_commit', 'naive', 322, 0, 0, 54, '03db1f11231d4b11'),  # noqa: E501
    ('switchover', 'clean', 'resume_after_silent_commit', 'sleep', 322, 0, 0, 54, '03db1f11231d4b11'),  # noqa: E501
    ('switchover', 'clean', 'resume_after_silent_commit', 'sleep+state', 118, 118, 118, 18, '5b3df84391a1c851'),  # noqa: E501
    ('switchover', 'clean', 'resume_after_silent_commit', 'dpor', 322, 0, 0, 54, '03db1f11231d4b11'),  # noqa: E501
    ('switchover', 'clean', 'resume_after_silent_commit', 'dpor+state', 118, 118, 118, 18, '5b3df84391a1c851'),  # noqa: E501
    ('tce-indirect', 't1-valid', 'correct', 'naive', 14, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('tce-indirect', 't1-valid', 'correct', 'sleep', 14, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('tce-indirect', 't1-valid', 'correct', 'dpor', 14, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('tce-indirect', 't1-valid', 'kernel', 'naive', 24, 0, 0, 10, '756856f5007c9e0b'),
    ('tce-indirect', 't1-valid', 'kernel', 'sleep', 24, 0, 0, 10, '756856f5007c9e0b'),
    ('tce-indirect', 't1-valid', 'kernel', 'dpor', 24, 0, 0, 10, '756856f5007c9e0b'),
    ('vfio-data-stream', 'restart', 'correct', 'naive', 16, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('vfio-data-stream', 'restart', 'correct', 'sleep', 16, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('vfio-data-stream', 'restart', 'correct', 'sleep+state', 6, 10, 10, 0, 'e3b0c44298fc1c14'),
    ('vfio-data-stream', 'restart', 'correct', 'dpor', 16, 0, 0, 0, 'e3b0c44298fc1c14'),
    ('vfio-data-stream', 'restart', 'correct', 'dpor+state', 6, 10, 10, 0, 'e3b0c44298fc1c14'),
    ('vfio-data-stream', 'precopy-info', 'precopy_info_unlocked', 'naive', 10, 0, 0, 1, '014d1476efebd5d9'),  # noqa: E501
    ('vfio-data-stream', 'precopy-info', 'precopy_info_unlocked', 'sleep', 10, 0, 0, 1, '014d1476efebd5d9'),  # noqa: E501
    ('vfio-data-stream', 'precopy-info', 'precopy_info_unlocked', 'sleep+state', 5, 5, 5, 1, '014d1476efebd5d9'),  # noqa: E501
    ('vfio-data-stream', 'precopy-info', 'precopy_info_unlocked', 'dpor', 10, 0, 0, 1, '014d1476efebd5d9'),  # noqa: E501
    ('vfio-data-stream', 'precopy-info', 'precopy_info_unlocked', 'dpor+state', 5, 5, 5, 1, '014d1476efebd5d9'),  # noqa: E501
]


def _digest(failures: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(failures)).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("scenario", "case", "mode", "strategy", "schedules", "pruned", "by_state", "failing",
     "digest"),
    PINNED, ids=["/".join(row[:4]) for row in PINNED])
def test_item6_counts_and_failures_as_before(
        scenario: str, case: str, mode: str, strategy: str, schedules: int, pruned: int,
        by_state: int, failing: int, digest: str) -> None:
    sc = all_scenarios()[scenario]
    build = next(c for c in sc.cases if c.name == case).build
    reduction, hashing = STRATEGIES[strategy]
    limits = SearchLimits(preemption_bound=1, max_steps=sc.max_steps, reduction=reduction)
    limits.state_hashing = hashing
    stats = search(lambda: build(mode), limits)
    failures = [f"{classify(o.error)}|{o.schedule}" for o in stats.outcomes
                if o.error is not None]
    assert (stats.schedules, stats.pruned, stats.pruned_by_state, len(failures)) == (
        schedules, pruned, by_state, failing)
    assert _digest(failures) == digest


def test_item6_pinned_rows_cover_every_scenario() -> None:
    assert {row[0] for row in PINNED} == set(all_scenarios())
