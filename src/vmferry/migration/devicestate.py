"""Device state around the stop, sans-IO: switchover-ack on the source (:class:`AckGate`)
and the devices' stop-copy state staged for the data channels (:class:`DeviceSink`,
:func:`stage_device_state`).

Switchover-ack (QEMU's capability of that name): a device with pre-copy streams its
initial data while the guest runs and marks its end with an INIT_SENT chunk; the source
may not stop the guest before the destination said it loaded every such device's initial
data.  The gate counts the markers the handlers promised and sent, holds the destination's
acknowledgement, and turns the load rate the destination measured into the prediction's
``device_load_ms``.  See docs/channel.md (switchover-ack) and docs/vfio.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from vmferry.errors import StreamUsageError
from vmferry.machine.handlers import DeviceData, DevicePhase, MigrationHandler, StatePiece
from vmferry.migration.context import MigrationStats


class DeviceSink(Protocol):
    """Where the devices' stop-copy state goes when it does not travel in the main
    stream: the data channels, in the final pass (channel protocol 1.2)."""

    def stage_device(self, pieces: list[DeviceData]) -> None:
        """Take the stop-copy chunks (views of stopped devices' data) before the final
        pass; they are sent with it."""
        ...


class AckGate:
    """The source's side of switchover-ack (see the module docstring)."""

    def __init__(self) -> None:
        #: the destination speaks it (the host sets this before the session starts)
        self.enabled = False
        #: INIT_SENT markers the handlers will send, and have sent
        self.markers_due = 0
        self.markers_sent = 0
        #: the destination's SWITCHOVER_ACK body, once it came
        self.ack: dict[str, Any] | None = None
        #: the session yielded [] to wait for it
        self.awaiting = False
        #: per device, the destination's last pre-copy chunk load (seconds, bytes), as it
        #: published it (the host reads it with its round trips)
        self.last_loads: dict[str, tuple[float, int]] = {}

    def setup(self, handlers: Iterable[MigrationHandler], offline: bool) -> None:
        """After the handlers' ``save_setup``: how many markers to expect (none offline:
        the guest is stopped from the start)."""
        if self.enabled and not offline:
            self.markers_due = sum(h.save_switchover_ack() for h in handlers)

    def may_stop(self) -> bool:
        """No handler needs the acknowledgement, or it arrived."""
        return self.markers_due == 0 or self.ack is not None

    def all_sent(self) -> bool:
        """Every promised marker went out: waiting for the ack is all that is left."""
        return self.markers_sent >= self.markers_due

    def count(self, piece: StatePiece) -> None:
        if isinstance(piece, DeviceData) and piece.phase is DevicePhase.INIT_SENT:
            self.markers_sent += 1

    def acknowledged(self, ack: Mapping[str, Any], stats: MigrationStats) -> None:
        if self.markers_due == 0:
            raise StreamUsageError("a switchover ack, but switchover-ack is not in use")
        self.ack = dict(ack)
        self.awaiting = False
        stats.switchover_ack = dict(ack)

    def load_s_per_byte(self) -> float:
        """The destination's device-load time per byte, as it measured loading the
        pre-copy data (0.0: not known)."""
        if self.ack is None:
            return 0.0
        try:
            n = int(self.ack.get("device_bytes", 0))
            ms = float(self.ack.get("load_ms", 0.0))
        except (TypeError, ValueError):
            return 0.0
        return ms / 1e3 / n if n > 0 and ms >= 0 else 0.0

    def device_load_ms(self, stop_bytes: int) -> float:
        """The prediction's share for the destination loading the stop-copy device state
        (``stop_bytes``: the handlers' ``stop_copy_bytes``).  The final load is one more
        chunk of the kind the destination loaded last in pre-copy -- the last save's
        image, whose load can cost more than its bytes (mlx5 checks the whole device
        image after each) -- so it costs what that chunk's load did, plus the stop-copy
        bytes beyond that chunk's size at the rate the destination measured loading the
        pre-copy data."""
        rate = self.load_s_per_byte()
        last_s = sum(s for s, _ in self.last_loads.values())
        if rate == 0.0 and last_s == 0.0:
            return 0.0
        last_bytes = sum(n for _, n in self.last_loads.values())
        beyond = max(0, stop_bytes - last_bytes)
        return (last_s + beyond * rate) * 1e3


def stage_device_state(handlers: Iterable[MigrationHandler], sink: DeviceSink,
                       stats: MigrationStats) -> dict[str, list[StatePiece]]:  # fmt: skip
    """The devices' stop-copy chunks (and each device's DONE) to ``sink`` before the
    final pass, to travel with it on the data channels; returns what is left of each
    handler whose pieces were taken (for the main stream)."""
    staged: dict[str, list[StatePiece]] = {}
    device: list[DeviceData] = []
    for h in handlers:
        if not h.device_ids:
            continue
        pieces = list(h.save_complete())
        staged[h.name] = [p for p in pieces if not isinstance(p, DeviceData)]
        for p in pieces:
            if isinstance(p, DeviceData):
                device.append(p)
                stats.device_bytes += len(p.data)
    if device:
        sink.stage_device(device)
    return staged
