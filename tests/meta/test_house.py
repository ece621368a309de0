"""Issue 14 item 7: the house rules of src/vmferry, enforced.

* no module over :data:`MAX_LINES` lines;
* no import cycle between modules, counting imports inside functions (imports under
  ``if TYPE_CHECKING:`` never run and do not count);
* nothing writes another class's private fields (``obj._x = ...`` is for the class that
  owns ``_x``).

``PENDING_SPLITS`` lists the modules still over the limit; an entry must go as soon as its
module is split (the test fails on a stale entry, so the list only shrinks).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "vmferry"
MAX_LINES = 700

#: modules over the limit whose split is under way elsewhere (remove the entry with it)
PENDING_SPLITS: set[str] = set()


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (path, is a package ``__init__``)."""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, package)
    return out


MODULES = _modules()


@functools.cache
def _tree(module: str) -> ast.Module:
    path = MODULES[module][0]
    return ast.parse(path.read_text(), str(path))


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of every node inside a module-level ``if TYPE_CHECKING:`` body."""
    skip: set[int] = set()
    for node in tree.body:
        if not isinstance(node, ast.If):
            continue
        test = node.test
        name = test.id if isinstance(test, ast.Name) else (
            test.attr if isinstance(test, ast.Attribute) else "")
        if name == "TYPE_CHECKING":
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def _resolve(name: str) -> str | None:
    """The longest known module ``name`` (or a prefix of it) names."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.Import | ast.ImportFrom, module: str, package: bool) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("vmferry"):
                found = _resolve(alias.name)
                if found:
                    yield found
        return
    if node.level:
        base = module.split(".") if package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not source.startswith("vmferry"):
        return
    for alias in node.names:
        full = f"{source}.{alias.name}"
        found = full if full in MODULES else _resolve(source)
        if found:
            yield found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> modules it imports when it runs (module level and inside functions)."""
    graph: dict[str, set[str]] = {}
    for module, (_, package) in MODULES.items():
        tree = _tree(module)
        skip = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) not in skip and isinstance(node, ast.Import | ast.ImportFrom):
                deps.update(_imported(node, module, package))
        deps.discard(module)
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_item7_no_module_over_700_lines() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, (p, _) in MODULES.items()}
    over = {m: n for m, n in sizes.items() if n > MAX_LINES and m not in PENDING_SPLITS}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
    stale = {m for m in PENDING_SPLITS if m not in sizes or sizes[m] <= MAX_LINES}
    assert not stale, f"split done: remove {sorted(stale)} from PENDING_SPLITS"


def test_item7_no_import_cycles_counting_function_level_imports() -> None:
    graph = import_graph()
    found = cycles(graph)
    detail = [
        "; ".join(f"{m} -> {sorted(d for d in graph[m] if d in c)}" for m in c) for c in found
    ]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_item7_cycle_finder_sees_function_level_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    source = "def f():\n    from vmferry.errors import ConfigError\n"
    tree = ast.parse(source)
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert list(_imported(node, "vmferry.sync", False)) == ["vmferry.errors"]
    guarded = ast.parse("if TYPE_CHECKING:\n    import vmferry.errors\n")
    assert len(_type_checking_nodes(guarded)) == 2  # the import and its alias


def _owned_private(cls: ast.ClassDef) -> set[str]:
    """Private attributes a class owns: its ``__slots__`` and ``self._x`` assignments."""
    owned: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
            owned.update(c.value for c in ast.walk(node.value)
                         if isinstance(c, ast.Constant) and isinstance(c.value, str))
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign) else [])
        for t in targets:
            if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                    and t.value.id == "self" and t.attr.startswith("_")):
                owned.add(t.attr)
    return owned


def _foreign_writes(source: str | ast.Module, name: str) -> list[str]:
    tree = ast.parse(source, name) if isinstance(source, str) else source
    out: list[str] = []

    def visit(node: ast.AST, owned: set[str]) -> None:
        if isinstance(node, ast.ClassDef):
            owned = _owned_private(node)
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        for t in targets:
            while isinstance(t, ast.Subscript):
                t = t.value
            if (isinstance(t, ast.Attribute) and t.attr.startswith("_")
                    and not t.attr.startswith("__")
                    and not (isinstance(t.value, ast.Name) and t.value.id in {"self", "cls"})
                    and t.attr not in owned):
                out.append(f"{name}:{node.lineno} writes .{t.attr}")
        for child in ast.iter_child_nodes(node):
            visit(child, owned)

    visit(tree, set())
    return out


def test_item7_nothing_writes_another_class_private_fields() -> None:
    found = [w for module in MODULES
             for w in _foreign_writes(_tree(module), module)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source", [
    "class A:\n    pass\ndef f(node):\n    node._props['x'] = 1\n",
    "class A:\n    def f(self, other):\n        other._hidden = 1\n",
])
def test_item7_private_write_check_catches(source: str) -> None:
    assert _foreign_writes(source, "probe")
    owner = "class A:\n    def f(self, other):\n        self._x = 1\n        other._x = 2\n"
    assert not _foreign_writes(owner, "probe")
