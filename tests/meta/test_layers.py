"""The import rules of docs/architecture.md, enforced.

A module in a layer may import only modules of layers to its left.  ``errors`` and ``sync``
form the base every layer may use.  ``hw``, ``guest``, ``machine``, ``migration`` and
``interop`` (other VMMs' artefacts, beside ``analysis``) are sans-IO: they may not import
sockets, threads, asyncio, subprocesses or wall clocks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "vmferry"

ORDER = ["base", "hw", "guest", "machine", "migration", "interop", "analysis", "testing",
         "host", "cli"]
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "hw": {"base", "hw"},
    "guest": {"base", "hw", "guest"},
    "machine": {"base", "hw", "guest", "machine"},
    "migration": {"base", "hw", "guest", "machine", "migration"},
    "interop": {"base", "hw", "guest", "machine", "migration", "interop"},
    "analysis": {"base", "hw", "guest", "machine", "migration", "analysis", "testing"},
    "testing": {"base", "hw", "guest", "machine", "migration", "testing"},
    "host": {"base", "hw", "guest", "machine", "migration", "host"},
    "cli": set(ORDER),
}
SANS_IO = {"hw", "guest", "machine", "migration", "interop"}
FORBIDDEN_IN_SANS_IO = {"socket", "threading", "asyncio", "subprocess", "selectors", "sqlite3"}
#: system-call modules a sans-IO layer may use only in the named modules: the KVM wrapper
#: (``hw.x86.kvm``) opens /dev/kvm, issues ioctls through libc and maps kvm_run pages --
#: but starts no threads and does no networking
SYSCALLS_ONLY_IN = {
    "ctypes": {"vmferry.hw.x86.kvm"},
    "fcntl": {"vmferry.hw.x86.kvm"},
    "os": {"vmferry.hw.x86.kvm"},
    "signal": set(),
    "time": set(),
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in {"errors", "sync", "sched", "clock", "__main__", "__init__"}:
        return "base"
    return parts[1]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        out.append((".".join(rel.parts), path))
    return out


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_layer_rules(module: str, path: Path) -> None:
    me = layer_of(module)
    if module == "vmferry.__main__":
        return
    for name in imports_of(path):
        if name.startswith("vmferry"):
            assert layer_of(name) in ALLOWED[me], f"{module} ({me}) imports {name}"
        elif me in SANS_IO:
            top = name.split(".")[0]
            assert top not in FORBIDDEN_IN_SANS_IO, f"sans-IO {module} imports {name}"
            if top in SYSCALLS_ONLY_IN:
                assert module in SYSCALLS_ONLY_IN[top], f"sans-IO {module} imports {name}"
