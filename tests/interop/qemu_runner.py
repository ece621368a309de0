"""Start a real QEMU, migrate it to a file with ``exec:cat > FILE``, return its counters.

Used by the tests (streams cached per session) and by ``tests/fixtures/qemu/make.py``,
which keeps a few small streams as fixtures.  QEMU runs with TCG (KVM for x86 when
``/dev/kvm`` is usable), ``-nodefaults``, no display and a few MiB of RAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

#: machine name -> (binary, extra arguments)
MACHINES: dict[str, tuple[str, list[str]]] = {
    "pc": ("qemu-system-x86_64", ["-M", "pc", "-m", "32"]),
    "q35": ("qemu-system-x86_64", ["-M", "q35", "-m", "32"]),
    "virt": ("qemu-system-aarch64", ["-M", "virt", "-cpu", "cortex-a57", "-m", "32"]),
    "pseries": ("qemu-system-ppc64", ["-M", "pseries", "-m", "256",
                                      "-device", "spapr-vscsi"]),
}


@dataclass
class Made:
    """One stream QEMU wrote, and what QEMU said about it."""

    machine: str
    accel: str
    path: Path
    ram: dict[str, Any] = field(default_factory=dict)
    status: str = ""


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def available(machine: str) -> bool:
    return shutil.which(MACHINES[machine][0]) is not None


async def _drive(sock: Path, out: Path, run_s: float) -> tuple[str, dict[str, Any]]:
    qmp = QMPClient("vmferry-test")
    for _ in range(200):
        try:
            await qmp.connect(str(sock))
            break
        except Exception:  # not listening yet
            await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"QEMU did not open its QMP socket {sock}")
    try:
        if run_s > 0:
            await qmp.execute("cont")
            await asyncio.sleep(run_s)
            await qmp.execute("stop")
        await qmp.execute("migrate", {"uri": f"exec:cat > {out}"})
        for _ in range(1200):
            info = await qmp.execute("query-migrate")
            assert isinstance(info, dict)
            if info.get("status") in ("completed", "failed", "cancelled"):
                return str(info["status"]), dict(info.get("ram", {}))
            await asyncio.sleep(0.05)
        raise RuntimeError("migration to file did not finish in 60 s")
    finally:
        with contextlib.suppress(Exception):
            await qmp.execute("quit")
        with contextlib.suppress(Exception):
            await qmp.disconnect()


def make_stream(machine: str, out: Path, *, accel: str = "tcg", run_s: float = 0.0,
                extra: list[str] | None = None) -> Made:
    """Start QEMU for ``machine`` (paused), optionally run it ``run_s`` seconds, migrate
    it to ``out`` and return QEMU's own ``query-migrate`` ram counters."""
    binary, args = MACHINES[machine]
    with tempfile.TemporaryDirectory(prefix="vmferry-qmp-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        cmd = [binary, *args, "-accel", accel, "-nodefaults", "-display", "none", "-S",
               "-qmp", f"unix:{sock},server=on,wait=off", *(extra or [])]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            status, ram = asyncio.run(_drive(sock, out, run_s))
        finally:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if status != "completed":
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"QEMU migration {status}: {err}")
    return Made(machine, accel, out, ram, status)


if __name__ == "__main__":
    import sys

    t0 = time.monotonic()
    m = make_stream(sys.argv[1], Path(sys.argv[2]), accel=sys.argv[3] if len(sys.argv) > 3
                    else "tcg", run_s=float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
    print(m, time.monotonic() - t0)
