"""The arm64 firmware state of a VM as a migratable component (``machine.vm.Component``).

One :class:`Arm64Component` per ``arch = "arm64"`` VM, built on the host daemon's profile:
it holds the :class:`~vmferry.machine.arm64.Arm64Machine` (KVM firmware state and cpreg
lists) and the guest's boot-time firmware view (which, being guest memory, migrates with
the guest).  ``save_state`` / ``load_state`` follow the Component protocol; ``load_state``
applies the cpreg lists with the configured merge (``classic`` = QEMU, ``strict`` = the
default after pre-flight) and raises :class:`~vmferry.machine.arm64.CpuLoadError` when the
destination kernel refuses -- the engine then aborts and the source resumes.

Record layout (big-endian)::

    "A64C" | u16 format=1 | u32 m | m bytes Arm64State (see machine.arm64) | guest view
    (``guest.psci_client.encode_view``; empty when the guest has not booted)
"""

from __future__ import annotations

import struct
from typing import Final

from vmferry.guest.psci_client import Arm64Guest, decode_view, encode_view
from vmferry.hw.kvm.arm64_fw import FwFaults
from vmferry.machine.arm64 import (
    Arm64Machine,
    Arm64StateDecodeError,
    LoadReport,
    MergeMode,
    decode_state,
    encode_state,
)
from vmferry.machine.profiles import HostProfile

_MAGIC: Final = b"A64C"
_HEADER = struct.Struct(">4sHI")


class Arm64Component:
    """Firmware registers + guest view of one arm64 VM on one host."""

    name = "arm64"

    def __init__(self, profile: HostProfile, vcpus: int = 1, *, psci_pin: int | None = None,
                 merge: MergeMode = MergeMode.STRICT, faults: FwFaults | None = None) -> None:
        self.machine = Arm64Machine(profile, vcpus, psci_pin, faults or FwFaults())
        self.guest = Arm64Guest()
        self.merge = merge
        self.last_load: LoadReport | None = None

    def boot(self) -> None:
        """First run on the boot host: the guest probes its firmware (once, here)."""
        self.machine.start()
        self.guest.boot(self.machine.port(0), self.machine.protection(),
                        cpu_has_ssbs=self.machine.vm.host.ssbs_everywhere)

    def save_state(self) -> bytes:
        machine = encode_state(self.machine.save())
        view = (encode_view(self.guest.view, self.guest.boot_status)
                if self.guest.view is not None else b"")
        return _HEADER.pack(_MAGIC, 1, len(machine)) + machine + view

    def load_state(self, data: bytes) -> None:
        """Apply an incoming record; CpuLoadError (destination refuses) leaves it unstarted."""
        if len(data) < _HEADER.size:
            raise Arm64StateDecodeError("truncated arm64 component header", 0)
        magic, fmt, size = _HEADER.unpack_from(data)
        if magic != _MAGIC or fmt != 1 or _HEADER.size + size > len(data):
            raise Arm64StateDecodeError("bad arm64 component header", 0)
        state = decode_state(data[_HEADER.size:_HEADER.size + size])
        rest = data[_HEADER.size + size:]
        view = decode_view(rest) if rest else None
        self.last_load = self.machine.load(state, self.merge)
        if view is not None:
            self.guest.restore(*view)
        self.machine.start()

    def report(self) -> dict[str, object]:
        """For the VM report: host firmware view and the guest's mitigation status now."""
        return {"firmware": self.machine.report(),
                "guest": self.guest.report(self.machine.protection())}
