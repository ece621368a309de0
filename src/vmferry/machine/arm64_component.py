"""The arm64 firmware state of a VM as a migratable component (``machine.vm.Component``).

One :class:`Arm64Component` per ``arch = "arm64"`` VM, built on the host daemon's profile:
it holds the :class:`~vmferry.machine.arm64.Arm64Machine` (KVM firmware state and cpreg
lists) and the guest's boot-time firmware view (which, being guest memory, migrates with
the guest).  ``save_state`` / ``load_state`` follow the Component protocol; ``load_state``
applies the cpreg lists with the configured merge (``classic`` = QEMU, ``strict`` = the
default after pre-flight) and raises :class:`~vmferry.machine.arm64.CpuLoadError` when the
destination kernel refuses -- the engine then aborts and the source resumes.

Record layout (big-endian), the header declared once as :data:`HEADER`
(:mod:`vmferry.hw.persist`)::

    "A64C" | u16 format=1 | u32 m | m bytes Arm64State (see machine.arm64) | guest view
    (``guest.psci_client.encode_view``; empty when the guest has not booted)
"""

from __future__ import annotations

from typing import Final

from vmferry.errors import StreamDecodeError
from vmferry.guest.psci_client import Arm64Guest, decode_view, encode_view
from vmferry.hw.kvm.arm64_fw import FwFaults
from vmferry.hw.persist import Field, Layout
from vmferry.machine.arm64 import (
    Arm64Machine,
    Arm64StateDecodeError,
    LoadReport,
    MergeMode,
    decode_state,
    encode_state,
)
from vmferry.machine.profiles import HostProfile

MAGIC: Final = b"A64C"
FORMAT: Final = 1
#: ``"A64C" | u16 format | u32 machine_len``, then the machine state and the guest view
HEADER = Layout("arm64 component", MAGIC, FORMAT, (Field("machine_len", "u32"),))


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
        return HEADER.encode({"machine_len": len(machine)}) + machine + view

    def load_state(self, data: bytes) -> None:
        """Apply an incoming record; CpuLoadError (destination refuses) leaves it unstarted."""
        try:
            head, at = HEADER.decode_head(data)
        except StreamDecodeError as exc:
            raise Arm64StateDecodeError(f"bad arm64 component header: {exc}",
                                        exc.offset) from exc
        size = head["machine_len"]
        if at + size > len(data):
            raise Arm64StateDecodeError(f"arm64 component: machine state of {size} bytes runs "
                                        f"past the record ({len(data)} bytes)", at)
        state = decode_state(data[at:at + size])
        rest = data[at + size:]
        view = decode_view(rest) if rest else None
        self.last_load = self.machine.load(state, self.merge)
        if view is not None:
            self.guest.restore(*view)
        self.machine.start()

    def report(self) -> dict[str, object]:
        """For the VM report: host firmware view and the guest's mitigation status now."""
        return {"firmware": self.machine.report(),
                "guest": self.guest.report(self.machine.protection())}
