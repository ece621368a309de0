"""Tests that cannot fail are refused: a static check over every test function in tests/.

Two rules, both read from the AST (no test is run):

1. **A test asserts something.**  Every ``test_*`` function (module level, or a method of a
   ``Test*`` class) must contain at least one of:

   * an ``assert`` statement;
   * a ``raise`` statement (an explicit failure);
   * a ``with pytest.raises(...)`` / ``pytest.warns(...)`` block, or a call of
     ``pytest.raises``, ``pytest.warns`` or ``pytest.fail``;
   * a call of an *assertion helper*: a function or method whose name starts with one of
     :data:`HELPER_PREFIXES` (``assert_``, ``check_``, ``expect_``, ``verify_``).  Such
     helpers must raise on a failed expectation; name a helper that way only if it does.

   A hypothesis ``@given`` test follows the same rule.  Stateful machines (``@rule`` /
   ``@invariant`` methods) are not test functions and are not checked here.

2. **An explorer test names the hazard it expects.**  An assertion that only checks that
   an explorer report has failures (``assert report.failures``, ``assert failures``,
   ``assert bool(r.failures) is faulty``, ``assert data["failures"]``) accepts *any*
   failure, including a model crash the explorer classifies as ``"exception"``.  A test
   function containing such an assertion must also look at what failed: mention a
   failure's ``.hazard`` or ``.error``, or call an assertion helper (rule 1), e.g.
   :func:`vmferry.testing.explore.assert_hazard`.

Each violation is reported as ``path:line: test_name: what to fix``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

#: names of assertion helpers start with one of these (they must raise on failure)
HELPER_PREFIXES = ("assert_", "check_", "expect_", "verify_")
#: ``pytest.<name>`` calls that count as an expectation
PYTEST_EXPECTATIONS = frozenset({"raises", "warns", "fail", "deprecated_call"})
#: attributes of an explorer failure that say what failed
FAILURE_DETAIL = frozenset({"hazard", "error"})


def _called_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _is_pytest_expectation(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and func.value.id == "pytest" and func.attr in PYTEST_EXPECTATIONS)


def _is_helper(call: ast.Call) -> bool:
    return _called_name(call).startswith(HELPER_PREFIXES)


def _own_nodes(fn: ast.AST) -> Iterator[ast.AST]:
    """Nodes of ``fn``'s body, including nested functions (closures assert for it too)."""
    for stmt in getattr(fn, "body", []):
        yield from ast.walk(stmt)


def has_expectation(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for node in _own_nodes(fn):
        if isinstance(node, ast.Assert | ast.Raise):
            return True
        if isinstance(node, ast.Call) and (_is_pytest_expectation(node) or _is_helper(node)):
            return True
    return False


def _names_failures(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "failures"
    if isinstance(node, ast.Attribute):
        return node.attr == "failures"
    if isinstance(node, ast.Subscript):
        key = node.slice
        return isinstance(key, ast.Constant) and key.value == "failures"
    return False


def _truthy_failures(test: ast.AST) -> bool:
    """Does this assert expression accept any failure (checks only that there are some)?"""
    if _names_failures(test):
        return True
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return any(_truthy_failures(v) for v in test.values)
    if isinstance(test, ast.Call) and _called_name(test) in ("bool", "len") and test.args:
        return _names_failures(test.args[0])
    if isinstance(test, ast.Compare) and isinstance(test.left, ast.Call) and test.left.args \
            and _names_failures(test.left.args[0]):
        name = _called_name(test.left)
        return name == "bool" or (name == "len" and isinstance(test.ops[0], ast.Gt | ast.GtE
                                                               | ast.NotEq))
    return False


def accepts_any_failure(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int | None:
    """Line of an accept-any-failure assert when the function never looks at what failed."""
    line = None
    for node in _own_nodes(fn):
        if isinstance(node, ast.Assert) and _truthy_failures(node.test):
            line = line or node.lineno
        if isinstance(node, ast.Attribute) and node.attr in FAILURE_DETAIL:
            return None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and node.slice.value in FAILURE_DETAIL:
            return None
        if isinstance(node, ast.Call) and _is_helper(node):
            return None
    return line


def functions_under_test(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                node.name.startswith("test"):
            yield node
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and \
                        item.name.startswith("test"):
                    yield item


def violations(source: str, path: str = "<test>") -> list[str]:
    """Every rule violation in one test module's source, as ``path:line: name: fix``."""
    out = []
    for fn in functions_under_test(ast.parse(source)):
        if not has_expectation(fn):
            out.append(
                f"{path}:{fn.lineno}: {fn.name}: asserts nothing -- add an `assert` on the "
                f"specific result, a `with pytest.raises(ExpectedError)`, or call an "
                f"assertion helper named {'/'.join(p + '*' for p in HELPER_PREFIXES)}")
        line = accepts_any_failure(fn)
        if line is not None:
            out.append(
                f"{path}:{line}: {fn.name}: accepts any explorer failure, even a model "
                f"crash classified 'exception' -- check the expected hazard and message "
                f"(e.g. `assert_hazard(report, 'use-after-free', 'fwspec')` from "
                f"vmferry.testing.explore, or assert on `f.hazard` of each failure)")
    return out


def test_every_test_can_fail() -> None:
    found: list[str] = []
    for path in sorted(TESTS.rglob("test_*.py")):
        rel = path.relative_to(TESTS.parent).as_posix()
        found += violations(path.read_text(encoding="utf-8"), rel)
    assert not found, "tests that cannot fail:\n" + "\n".join(found)


# --- the checker itself ------------------------------------------------------------------


def test_refuses_a_test_without_assertion() -> None:
    src = "def test_x():\n    y = compute()\n"
    (message,) = violations(src)
    assert message.startswith("<test>:1: test_x: asserts nothing")


def test_accepts_each_kind_of_expectation() -> None:
    bodies = [
        "assert f() == 1",
        "with pytest.raises(ValueError):\n        f()",
        "pytest.raises(ValueError, f)",
        "pytest.fail('no')",
        "raise AssertionError('x')",
        "assert_same(a, b)",
        "io.check_invariants()",
        "expect_errno(22, f)",
        "def inner():\n        assert f()\n    run(inner)",
    ]
    for body in bodies:
        assert violations(f"def test_x():\n    {body}\n") == [], body


def test_hypothesis_given_test_needs_a_helper_or_assert() -> None:
    bare = "@given(st.integers())\ndef test_h(n):\n    f(n)\n"
    assert len(violations(bare)) == 1
    helper = "@given(st.integers())\ndef test_h(n):\n    check_roundtrip(n)\n"
    assert violations(helper) == []


def test_methods_of_test_classes_are_checked() -> None:
    src = "class TestA:\n    def test_m(self):\n        pass\n    def helper(self):\n" \
          "        pass\n"
    (message,) = violations(src)
    assert "test_m: asserts nothing" in message


def test_refuses_an_explorer_test_that_accepts_any_failure() -> None:
    for check in ("assert report.failures", "assert bool(report.failures) is faulty",
                  "assert r.complete and r.failures", 'assert data["failures"]',
                  "assert len(report.failures) > 0"):
        src = f"def test_e():\n    report = run_scenario(S)\n    {check}\n"
        (message,) = violations(src)
        assert "accepts any explorer failure" in message, check


def test_accepts_an_explorer_test_that_names_the_hazard() -> None:
    for check in ("assert report.failures[0].hazard == 'use-after-free'",
                  "assert_hazard(report, 'null-deref', 'D->iommu')",
                  "assert all(isinstance(f.error, HazardError) for f in report.failures)"):
        src = f"def test_e():\n    report = run_scenario(S)\n    assert report.failures\n" \
              f"    {check}\n"
        assert violations(src) == [], check


def test_accepts_an_explorer_test_that_expects_no_failure() -> None:
    for check in ("assert report.failures == []", "assert not report.failures",
                  "assert len(report.failures) == 0"):
        src = f"def test_e():\n    report = run_scenario(S)\n    {check}\n"
        assert violations(src) == [], check
