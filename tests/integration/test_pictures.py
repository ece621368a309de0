"""Issue 13 item 9: the job report charts and the matrix grid, rendered in headless
Chromium and checked for what is drawn (DOM elements and screenshot pixels)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vmferry.analysis.matrix import run_matrix, specs
from vmferry.analysis.matrix_html import COLOURS as OUTCOME_COLOURS
from vmferry.cli.charts import COLOURS, write_html, write_png
from vmferry.cli.main import cli
from vmferry.clock import ManualClock
from vmferry.machine.vm import create_vm
from vmferry.migration.destination import DestinationSession
from vmferry.migration.local import migrate_locally
from vmferry.migration.source import MigrationParams, SourceSession

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)"),
]


def chromium(*args: str) -> str:
    assert CHROMIUM is not None
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--hide-scrollbars", *args], capture_output=True, text=True,
                         timeout=180, check=True)
    return out.stdout


def screenshot(page: Path, out: Path, size: str) -> np.ndarray[Any, Any]:
    chromium(f"--screenshot={out}", f"--window-size={size}", page.as_uri())
    return np.asarray(Image.open(out).convert("RGB"))


def pixels_of(img: np.ndarray[Any, Any], colour: str, tol: int = 12) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img.astype(int) - rgb).max(axis=2) <= tol).sum())


def migrated_job() -> dict[str, Any]:
    """A real job: a guest dirtying faster than the link, so passes, throttle and a
    downtime limit that is hard to meet."""
    vm = create_vm({"name": "chart", "memory_mib": 32, "vcpus": 2, "fill": "random",
                    "workload": {"dirty_rate_mbps": 150, "pattern": "uniform"}})
    vm.start()
    clock = ManualClock()
    params = MigrationParams(downtime_limit_ms=20, max_passes=3)
    src = SourceSession(vm, params, clock)
    migrate_locally(src, DestinationSession(clock), clock, link_bytes_per_s=200e6,
                    on_time=vm.run_slice)
    return {"id": "chart1", "vm": "chart", "role": "source", "status": "completed",
            "peer": "http://127.0.0.1:1", "params": params.to_json(), "error": "", "step": "",
            "stats": src.stats.to_json()}


def test_item9_job_report_html_draws_every_series(tmp_path: Path) -> None:
    job = migrated_job()
    passes = job["stats"]["passes"]
    assert len(passes) >= 4 and passes[-1]["throttle_pct"] > 0  # something to draw
    page = tmp_path / "report.html"
    write_html(job, page)
    dom = chromium("--dump-dom", page.as_uri())
    svg = dom[dom.index("<svg"):dom.index("</svg>")]
    for colour in COLOURS.values():
        assert colour in svg, colour
    for label in ("sent (MiB)", "MiB/s", "expected downtime", "downtime limit", "throttle (%)",
                  "pre-copy pass"):
        assert label in svg, label
    # one bar per pass in the bytes panel
    bars = re.findall(r'<path[^>]*style="[^"]*fill: ?' + COLOURS["sent"], svg)
    assert len(bars) >= len(passes)
    img = screenshot(page, tmp_path / "report.png", "1000,1300")
    for name, colour in COLOURS.items():
        assert pixels_of(img, colour) > 50, name


def test_item9_job_report_png(tmp_path: Path) -> None:
    out = tmp_path / "passes.png"
    write_png(migrated_job(), out)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (1000, 900, 3)
    for name, colour in COLOURS.items():
        assert pixels_of(img, colour) > 30, name


def test_item9_matrix_grid_coloured_with_legend_and_reasons(tmp_path: Path) -> None:
    profiles = ["arm64-linux-4.16", "arm64-linux-5.19"]
    result = CliRunner().invoke(cli, ["matrix", "--profiles", ",".join(profiles),
                                      "--guest-psci", "default,0.2", "--compat", "qemu",
                                      "--html"])
    assert result.exit_code == 0, result.output
    page = tmp_path / "matrix.html"
    page.write_text(result.stdout)
    dom = chromium("--dump-dom", page.as_uri())
    cells = re.findall(r'<td class="o-([a-z_]+)" data-outcome="\1"\s+title="([^"]*)"', dom)
    computed = run_matrix(specs(profiles, ["default", "0.2"], compat="qemu"))
    triples = {(c.source, c.destination, c.guest_psci) for c in computed}
    assert len(cells) == len(triples) >= 6  # one grid cell per (source, destination, PSCI)
    outcomes = {o for o, _ in cells}
    assert {"degraded", "fails_after_stop"} <= outcomes
    assert all(title.strip() for _, title in cells)  # the reason on every cell
    assert dom.count('class="swatch') == 4 and 'id="legend"' in dom
    assert dom.count("<table class=\"grid\"") == 2
    chips = re.findall(r'<span class="chip o-([a-z_]+)" title="([^"]+)"', dom)
    assert len(chips) == len(computed)  # one chip per mitigation pair
    assert {o for o, _ in chips} == {c.outcome for c in computed}
    img = screenshot(page, tmp_path / "matrix.png", "1100,1600")
    for outcome, colour in OUTCOME_COLOURS.items():
        drawn = pixels_of(img, colour, tol=3)
        if outcome in outcomes:
            assert drawn > 5000, outcome  # whole cells are filled with it
        elif outcome in {c.outcome for c in computed}:
            assert drawn > 800, outcome  # chips
        else:
            assert 100 < drawn < 1500, outcome  # only its legend swatch
