"""Registry of ``explore races`` scenarios.

Each scenario lives in its own module here and exposes ``SCENARIO``; add the module's name
to ``_MODULES`` to make it visible to the CLI and the tests.
"""

from __future__ import annotations

import importlib

from vmferry.analysis.explore.api import Scenario

_MODULES: tuple[str, ...] = (
    "dirty_log", "iommu_probe", "lpm_update", "switchover", "tce_indirect", "vfio_data_stream",
)


def all_scenarios() -> dict[str, Scenario]:
    found: dict[str, Scenario] = {}
    for mod in _MODULES:
        scenario: Scenario = importlib.import_module(f"{__name__}.{mod}").SCENARIO
        found[scenario.name] = scenario
    return found
