"""Fault injection on the migration connection (source side), for tests and drills.

A fault is ``PHASE:ACTION``:

* phases: ``setup`` (after the handshake, before the stream), ``active`` (after the first
  batch of pass 1), ``device`` (after the first batch with vCPUs paused), ``ack`` (after
  END, before the destination's answer), ``commit`` (the COMMIT frame: ``corrupt`` sends
  it damaged, ``cut`` closes the connection right after it, so RESUMED never arrives);
* actions: ``cut`` (close the connection), ``corrupt`` (flip a payload byte after its
  checksum was computed: the destination must refuse the record), ``version`` (announce
  stream version 2: the destination must refuse the stream; phase ``setup`` only),
  ``unlogged-write`` (once the first batch of pass 1 is out, store into guest page 0
  behind the dirty log's back, as a DMA the log never sees: the destination ends up with
  other RAM than the source and verification must catch it before COMMIT; phase
  ``active`` only).

``cut-channel:N`` closes parallel data channel ``N`` after its first batch of pass 1
(migrations with ``parallel`` > N): a cut in any channel must fail the whole migration.
``cut-channel:N:P`` (P >= 2) closes it in pass ``P`` instead, after its first batch that
holds a SCATTER record (scattered dirty pages).
``cut-device-channel:N`` closes channel N after its first batch of device state in the
final pass (guest paused; device state goes over the channels to a destination of channel
protocol 1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.errors import ConfigError
from vmferry.migration.stream import format as fmt
from vmferry.migration.stream.records import Buffer

PHASES = ("setup", "active", "device", "ack", "commit")
ACTIONS = ("cut", "corrupt", "version", "unlogged-write")


@dataclass(frozen=True)
class Fault:
    phase: str
    action: str
    #: ``cut-channel``: the pass in which the channel is cut
    at_pass: int = 1

    @classmethod
    def parse(cls, text: str) -> Fault:
        phase, _, action = text.partition(":")
        if phase == "cut-device-channel":
            if not (action.isdigit() and int(action) < 16):
                raise ConfigError(f"fault {text!r}: cut-device-channel:N takes a channel "
                                  "index from 0 to 15")
            return cls(phase, str(int(action)))
        if phase == "cut-channel":
            action, _, at = action.partition(":")
            if not (action.isdigit() and int(action) < 16) or (at and not (
                    at.isdigit() and 1 <= int(at) <= 1000)):  # fmt: skip
                raise ConfigError(f"fault {text!r}: cut-channel:N[:P] takes a channel index "
                                  "from 0 to 15 and a pass from 1 to 1000")
            return cls(phase, str(int(action)), int(at) if at else 1)
        if phase not in PHASES or action not in ACTIONS:
            raise ConfigError(
                f"fault {text!r}: expected PHASE:ACTION with PHASE in {PHASES} "
                f"and ACTION in {ACTIONS}"
            )
        if action == "version" and phase != "setup":
            raise ConfigError("the version fault applies to the setup phase only")
        if phase == "commit" and action not in ("corrupt", "cut"):
            raise ConfigError("the commit phase takes the corrupt or cut fault")
        if action == "unlogged-write" and phase != "active":
            raise ConfigError("the unlogged-write fault applies to the active phase only")
        return cls(phase, action)

    def __str__(self) -> str:
        more = f":{self.at_pass}" if self.at_pass != 1 else ""
        return f"{self.phase}:{self.action}{more}"


class CutConnection(Exception):
    """Raised inside the sender to simulate the connection going away."""


def apply(fault: Fault | None, phase: str, buffers: list[Buffer]) -> list[Buffer]:
    """The buffers as the faulty wire carries them in ``phase``."""
    if fault is None or fault.phase != phase:
        return buffers
    if fault.action == "cut":
        raise CutConnection(f"injected fault {fault}")
    if fault.action == "unlogged-write":  # the sender does it (it needs the guest)
        return buffers
    out = list(buffers)
    if fault.action == "version":
        head = bytearray(out[0])
        fmt.FILE_HEADER.pack_into(head, 0, fmt.MAGIC, fmt.MAJOR + 1, 0, 0)
        out[0] = bytes(head)
        return out
    # corrupt: flip a byte in the largest buffer (a payload, after its checksum was taken)
    i = max(range(len(out)), key=lambda k: len(out[k]))
    data = bytearray(out[i])
    data[len(data) // 2] ^= 0xFF
    out[i] = bytes(data)
    return out
