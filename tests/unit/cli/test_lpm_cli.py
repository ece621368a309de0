"""``vmferry lpm``: tree / plan / apply round trip through files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmferry.cli.main import cli
from vmferry.hw.devtree import load_fdt
from vmferry.hw.devtree.tree import canonical


def test_tree_plan_apply(tmp_path: Path) -> None:
    r = CliRunner()
    a, b, g = tmp_path / "a.dtb", tmp_path / "b.dtb", tmp_path / "g.dtb"
    assert r.invoke(cli, ["lpm", "tree", "--vcpus", "2", "-o", str(a)]).exit_code == 0
    assert r.invoke(cli, ["lpm", "tree", "--vcpus", "2", "--numa-domain", "1",
                          "-o", str(b)]).exit_code == 0
    plan = json.loads(r.invoke(cli, ["lpm", "plan", str(a), str(b), "--json"]).output)
    assert [d["path"] for d in plan["delete"]][-1] == "/ibm,platform-facilities"
    assert any(u["path"] == "/rtas" for u in plan["update"])
    res = r.invoke(cli, ["lpm", "apply", str(a), str(a), str(b), "-o", str(g), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["ok"] and any(c["kind"] == "update-property" for c in rep["changes"])
    assert canonical(load_fdt(g.read_bytes()).root) == canonical(load_fdt(b.read_bytes()).root)
    bad = r.invoke(cli, ["lpm", "apply", str(a), str(a), str(b), "--mode", "no_pf_skip"])
    assert bad.exit_code == 1 and "dangling-parent" in bad.output


def test_bad_dtb(tmp_path: Path) -> None:
    p = tmp_path / "x.dtb"
    p.write_bytes(b"not a dtb at all, really not" * 4)
    res = CliRunner().invoke(cli, ["lpm", "plan", str(p), str(p)])
    assert res.exit_code == 2


def test_issue13_plan_prints_a_table_not_python_dicts(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from vmferry.cli import lpm

    monkeypatch.setattr(lpm, "console", Console(width=160))  # one table row a line
    r = CliRunner()
    a, b = tmp_path / "a.dtb", tmp_path / "b.dtb"
    r.invoke(cli, ["lpm", "tree", "--vcpus", "2", "-o", str(a)])
    r.invoke(cli, ["lpm", "tree", "--vcpus", "2", "--numa-domain", "1", "-o", str(b)])
    res = r.invoke(cli, ["lpm", "plan", str(a), str(b)])
    assert res.exit_code == 0, res.output
    assert "{" not in res.output and "'" not in res.output
    assert "4 deletes, 5 updates, 1 add" in res.output
    rows = [line.split() for line in res.output.splitlines()]
    assert ["update", "0x10000002", "/rtas", "ibm,max-associativity-domains"] in rows
    assert ["delete", "0xfffffff6", "/ibm,platform-facilities"] in rows
