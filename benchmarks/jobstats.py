"""Figures the migration benchmarks take from a vmferry job's statistics (a helper module
of ``kvm_migration.py`` and ``migration_throughput.py``, which import it from their own
directory)."""

from __future__ import annotations

from typing import Any


def final_pass(st: dict[str, Any]) -> dict[str, Any]:
    """What the prediction's RAM part rests on: the pages the final pass sent (all pages
    sent minus the pre-copy passes'), and the last pre-copy pass's pages, seconds and
    dirty pages."""
    passes = st.get("passes", [])
    sent = st["ram"]["normal"] + st["ram"]["duplicate"]
    last = passes[-1] if passes else {}
    return {"final_pass_pages": sent - sum(p["pages"] for p in passes),
            "last_pass": {k: last.get(k) for k in ("pages", "normal", "seconds",
                                                    "dirty_pages")}}
