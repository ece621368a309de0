"""Device-tree import refuses deep trees, foreign encodings and duplicate properties with
a typed error (issue 10, Why 14, 16, 17), and ``lpm plan`` says so in one line."""

from __future__ import annotations

from pathlib import Path

import libfdt
import pytest
from click.testing import CliRunner

from vmferry.cli.main import cli
from vmferry.hw.devtree import FdtDecodeError, load_fdt
from vmferry.hw.devtree.fdt import MAX_DEPTH


def chain(depth: int, props: list[tuple[str, bytes]] | None = None,
          leaf: str = "n") -> bytes:
    sw = libfdt.FdtSw(size_hint=64 * depth + 4096)
    sw.finish_reservemap()
    sw.begin_node("")
    for name, value in props or []:
        sw.property(name, value)
    for _ in range(depth):
        sw.begin_node(leaf)
    for _ in range(depth + 1):
        sw.end_node()
    fdt = sw.as_fdt()
    fdt.pack()
    return bytes(fdt.as_bytearray())


def test_trees_up_to_the_limit_load() -> None:
    tree = load_fdt(chain(MAX_DEPTH))
    assert sum(1 for _ in tree.walk()) == MAX_DEPTH + 1


def test_issue10_16_deep_tree_refused_at_import() -> None:
    with pytest.raises(FdtDecodeError, match="deeper than"):
        load_fdt(chain(MAX_DEPTH + 1))


def test_issue10_16_lpm_plan_on_a_20000_deep_tree(tmp_path: Path) -> None:
    deep = tmp_path / "deep.dtb"
    deep.write_bytes(chain(20000))
    result = CliRunner().invoke(cli, ["lpm", "plan", str(deep), str(deep)])
    assert result.exit_code == 2 and not isinstance(result.exception, RecursionError)
    assert "deeper than" in result.output


def test_issue10_14_foreign_encodings_refused_at_import() -> None:
    blob = bytearray(chain(1, [("zzzzprop", b"x")], leaf="qqqqnode"))
    for placeholder, raw in ((b"zzzz", b"\xff\xfe\xfd\xfc"), (b"qqqq", b"\xe9t\xe9\xff")):
        bad = bytes(blob).replace(placeholder, raw)
        with pytest.raises(FdtDecodeError, match="ASCII"):
            load_fdt(bad)
    utf8 = bytes(blob).replace(b"qqqqnode", "qé".encode() + b"node"[:5])
    with pytest.raises(FdtDecodeError):
        load_fdt(utf8)


def test_issue10_17_duplicate_properties_refused() -> None:
    blob = chain(0, [("model", b"a\0"), ("model", b"b\0")])
    with pytest.raises(FdtDecodeError, match="twice"):
        load_fdt(blob)
