"""The source worker's part of switchover-ack and of device state over the data channels
(channel protocol 1.2; see docs/channel.md): what it negotiates from the WELCOME, and the
wait for the destination's SWITCHOVER_ACK before the session may stop the guest."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmferry.errors import VmferryError
from vmferry.host import datachannels
from vmferry.host.records import Job
from vmferry.host.states import JobStatus
from vmferry.host.transport import Channel
from vmferry.migration.channel import Closed, Event, SwitchoverAck, Welcome
from vmferry.migration.channel.frames import SWITCHOVER_ACK_MINOR
from vmferry.migration.source import SourceSession
from vmferry.migration.stream.records import Buffer


class SwitchoverAckSide:
    """Mixed into the source worker, which provides the attributes and the bounded-wait
    helpers declared here."""

    session: SourceSession
    job: Job
    channels: datachannels.ChannelSink | None

    if TYPE_CHECKING:  # the worker's own methods, which these parts call
        def _persist(self, status: JobStatus | str, step: str = "") -> None: ...
        def _publish(self) -> None: ...
        def _set_bound(self, *, loading: bool = False) -> None: ...
        def _on_stall(self, seconds: float) -> None: ...
        def _remote(self, ev: Event | Closed, what: str) -> VmferryError: ...

    def _negotiate_switchover_ack(self, welcome: Welcome) -> None:
        """Switchover-ack when the destination speaks it (channel 1.2); with an older
        destination the guest stops when pre-copy converges, as before."""
        self.session.ack.enabled = welcome.minor >= SWITCHOVER_ACK_MINOR
        self.job.progress["switchover_ack"] = self.session.ack.enabled

    def _device_over_channels(self) -> None:
        """With data channels to a destination of channel 1.2, the devices' stop-copy
        state travels on them (in the final pass) instead of the main stream."""
        if self.channels is not None and self.session.ack.enabled:
            self.session.device_sink = self.channels

    def _took_switchover_ack(self, ev: Event | Closed) -> bool:
        """``ev`` is the destination's SWITCHOVER_ACK: hand it to the session."""
        if not isinstance(ev, SwitchoverAck):
            return False
        self.session.switchover_acknowledged(ev.ack)
        return True

    def _next_buffers(self, ch: Channel) -> list[Buffer]:
        """The session's next buffers; where it waits for the destination's
        SWITCHOVER_ACK before it may stop the guest, wait for it here (bounded like every
        wait with the guest running; a cancel acts) and go on."""
        bufs = self.session.next_buffers()
        while not bufs and self.session.ack.awaiting:
            self._persist(self.session.status.value, self.session.current_step())
            self._publish()
            self._set_bound()
            ev = ch.next_event(self._on_stall)
            if not self._took_switchover_ack(ev):
                raise self._remote(ev, "stream")
            bufs = self.session.next_buffers()
        return bufs
