"""The computed matrix: JSON schema, seed-thread cases and whole-matrix invariants."""

from __future__ import annotations

import json

import pytest

from vmferry.analysis.matrix import (
    GUEST_PSCI,
    MITIGATIONS,
    OUTCOMES,
    Cell,
    CellSpec,
    run_cell,
    run_matrix,
    specs,
    summary,
    to_markdown,
)
from vmferry.analysis.matrix_html import to_html
from vmferry.errors import ConfigError
from vmferry.machine.profiles import list_profiles

REQUIRED = {"source": str, "destination": str, "guest_psci": str, "source_mitigation": str,
            "destination_mitigation": str, "outcome": str, "reason": str}
OLD, NEW = "arm64-linux-4.16", "arm64-linux-4.17"


@pytest.fixture(scope="module")
def qemu_cells() -> list[Cell]:
    return run_matrix(specs(compat="qemu"))


@pytest.fixture(scope="module")
def preflight_cells() -> list[Cell]:
    return run_matrix(specs(compat="preflight"))


def keyed(cells: list[Cell]) -> dict[tuple[str, ...], Cell]:
    return {(c.source, c.destination, c.guest_psci, c.source_mitigation,
             c.destination_mitigation): c for c in cells}


def test_json_schema(qemu_cells: list[Cell]) -> None:
    data = json.loads(json.dumps([c.to_json() for c in qemu_cells]))
    assert isinstance(data, list) and data
    for item in data:
        for key, kind in REQUIRED.items():
            assert isinstance(item[key], kind), key
        assert item["outcome"] in OUTCOMES
        assert item["guest_psci"] in GUEST_PSCI
        assert item["source_mitigation"] in MITIGATIONS
        assert item["source"] in list_profiles() and item["destination"] in list_profiles()
        assert item["reason"]
        assert item["source_running"] is (item["outcome"] in ("refused", "fails_after_stop"))


def test_every_applicable_cell_is_present(qemu_cells: list[Cell]) -> None:
    n = len(list_profiles())
    no_register = 2  # 4.15 and 4.16 cannot pin a version: explicit choices do not exist
    assert len(qemu_cells) == (n * n + 2 * (n - no_register) * n) * len(MITIGATIONS) ** 2
    assert not [c for c in qemu_cells if c.guest_psci != "default"
                and c.source in ("arm64-linux-4.15", "arm64-linux-4.16")]


def test_seed_cases(qemu_cells: list[Cell]) -> None:
    cells = keyed(qemu_cells)
    up = cells[(OLD, NEW, "default", "avail", "avail")]
    assert up.outcome == "migrates"  # (1) old -> new upgrades silently and harmlessly
    assert cells[("arm64-linux-4.15", OLD, "default", "avail", "avail")].psci_after == "1.0"
    down = cells[(NEW, OLD, "default", "avail", "avail")]
    assert down.outcome == "fails_after_stop"  # (2) new -> old fails, no silent loss
    assert cells[(NEW, NEW, "0.2", "avail", "avail")].outcome == "migrates"  # (3) pinned 0.2
    assert cells[(NEW, NEW, "0.2", "avail", "avail")].psci_after == "0.2"


def test_preflight_never_fails_after_stop_nor_degrades_silently(
        qemu_cells: list[Cell], preflight_cells: list[Cell]) -> None:
    assert summary(preflight_cells)["fails_after_stop"] == 0
    assert summary(preflight_cells)["degraded"] == 0
    pre = keyed(preflight_cells)
    for key, q in keyed(qemu_cells).items():
        if q.outcome == "degraded":
            assert pre[key].outcome == "refused", key
        elif q.outcome == "fails_after_stop" and pre[key].outcome != "refused":
            # only the tolerated VENDOR_HYP_BMAP_2 = 0 (docs/models/psci-firmware-registers.md
            # §5.4) lets pre-flight proceed
            assert pre[key].outcome == "migrates", key
            assert q.register == "VENDOR_HYP_BMAP_2", key


def test_allow_degraded_announces_losses() -> None:
    cells = run_matrix(specs([OLD], compat="preflight", allow_degraded=True))
    degraded = [c for c in cells if c.outcome == "degraded"]
    assert degraded and all(c.lost for c in degraded)


def test_impossible_pin_is_not_a_cell() -> None:
    assert run_cell(CellSpec(OLD, NEW, "0.2", "avail", "avail")) is None


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        run_cell(CellSpec(OLD, NEW, "default", "avail", "avail", "bogus"))
    with pytest.raises(ConfigError):
        run_cell(CellSpec(OLD, NEW, "default", "sometimes", "avail"))
    with pytest.raises(ConfigError):
        run_cell(CellSpec("arm64-linux-9.9", NEW, "default", "avail", "avail"))


def test_renderers(qemu_cells: list[Cell]) -> None:
    subset = [c for c in qemu_cells if c.source in (OLD, NEW) and c.destination in (OLD, NEW)]
    md = to_markdown(subset)
    assert "| Source | Destination | Guest PSCI |" in md
    assert "fails_after_stop" in md and "degraded" in md
    page = to_html(subset)
    assert page.startswith("<!DOCTYPE html>") and '<table class="grid"' in page
    assert 'id="legend"' in page and "fails after the source stopped" in page
