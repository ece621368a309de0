"""Fresh QEMU streams, made once per test session and shared by xdist workers."""

from __future__ import annotations

import fcntl
import json
import lzma
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.qemu_runner import MACHINES, Made, kvm_usable, make_stream

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qemu"

#: (machine, accel) pairs the tests make; KVM only where /dev/kvm is usable
CASES = [("pc", "tcg"), ("q35", "tcg"), ("virt", "tcg"), ("pseries", "tcg"),
         ("pc", "kvm"), ("q35", "kvm")]


def case_ids() -> list[str]:
    return [f"{m}-{a}" for m, a in CASES]


@pytest.fixture(scope="session")
def qemu_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    base = tmp_path_factory.getbasetemp()
    root = base.parent if worker_id.startswith("gw") else base
    d = root / "qemu-streams"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def qemu_stream(qemu_dir: Path) -> Callable[[str, str], Made]:
    """``qemu_stream(machine, accel)``: the stream QEMU wrote and its own counters."""

    def get(machine: str, accel: str) -> Made:
        binary = MACHINES[machine][0]
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is not installed (.ci/run installs the Debian QEMU "
                        "packages qemu-system-x86, qemu-system-arm, qemu-system-ppc)")
        if accel == "kvm" and not kvm_usable():
            pytest.skip("/dev/kvm is not usable here")
        path = qemu_dir / f"{machine}-{accel}.qevm"
        meta = path.with_suffix(".json")
        with (qemu_dir / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not meta.exists():
                made = make_stream(machine, path, accel=accel, run_s=0.3)
                meta.write_text(json.dumps({"ram": made.ram, "status": made.status}))
        info = json.loads(meta.read_text())
        return Made(machine, accel, path, info["ram"], info["status"])

    return get


def fixture_bytes(name: str) -> bytes:
    return lzma.decompress((FIXTURES / f"{name}.qevm.xz").read_bytes())


def fixture_meta() -> dict[str, dict[str, object]]:
    data: dict[str, dict[str, object]] = json.loads((FIXTURES / "streams.json").read_text())
    return data
