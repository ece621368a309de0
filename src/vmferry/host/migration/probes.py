"""The source worker's probes for the downtime predicted at the stop decision (the
session's :class:`~vmferry.migration.prediction.LinkProbe`): round trips to the
destination and job writes sampled at quiet moments (:class:`FixedCosts` keeps their
medians), the destination's own timed job writes read from its job, the bytes in flight,
and the wait before the stop until the destination took what was sent.  See
docs/performance.md ("A downtime that is predicted")."""

from __future__ import annotations

import time
from statistics import median
from typing import TYPE_CHECKING, Any, TypeVar

from vmferry.errors import ApiError, HostError
from vmferry.host import datachannels
from vmferry.host.client import HostClient
from vmferry.host.migration.common import RECEIVE_BUFFER, MigrationHost
from vmferry.host.records import Job
from vmferry.host.tls import client_context
from vmferry.host.transport import Channel, SocketLink, tcp_rtt_s
from vmferry.migration.context import MigrationStats
from vmferry.migration.prediction import (
    SETTLE_BOUND_S,
    SWITCHOVER_ROUND_TRIPS,
    FixedCosts,
    device_kinds,
)
from vmferry.migration.source import SourceSession

K = TypeVar("K", bound=tuple[object, ...])

#: the best bandwidth a pass measured to each destination (its control URL), kept for
#: migrations whose passes are too small to measure it themselves
_LINK_BANDWIDTH: dict[str, float] = {}
#: what the switchover after the stream paid (s: the exchange beyond its round trips, the
#: writes in it, the destination's load and adopt), the last few migrations per
#: destination (its control URL) and kinds of devices (their loads differ), for the
#: downtime prediction (:attr:`FixedCosts.measured`)
_SWITCHOVER_FIXED: dict[tuple[str, tuple[str, ...]], list[float]] = {}
#: the same for stopping the guest and the final read and stop of the dirty log (s)
_STOP_FIXED: dict[tuple[str, tuple[str, ...]], list[float]] = {}
#: the rates (seconds per byte) at which device state was read and sent with the guest
#: stopped, the last few, per destination (its control URL), kinds of devices and path
#: (the main stream or the data channels: they differ 1.5-2x here): for devices without
#: pre-copy, whose state nothing can read before the stop; their median counts
_STOP_DEVICE_RATE: dict[tuple[str, tuple[str, ...], bool], list[float]] = {}
#: the samples each of those tables keeps per key (the last ones; their median counts)
REMEMBERED_SAMPLES = 5
#: how often the source looks, before the stop, whether the destination took what was
#: sent (``LinkProbeSide.settle``, bounded by ``SETTLE_BOUND_S``)
SETTLE_POLL_S = 0.001
#: job writes timed at the stop decision (a quiet moment: between passes), beside the one
#: timed at the end of every pass before it (``LinkProbeSide.quiet``)
DECISION_SAMPLES = 3


class LinkProbeSide:
    """Mixed into the source worker, which provides the attributes declared here."""

    daemon: MigrationHost
    job: Job
    session: SourceSession
    ch: Channel | None
    channels: datachannels.ChannelSink | None
    fixed: FixedCosts

    if TYPE_CHECKING:  # the worker's own method, which the settle wait calls
        def _check_cancel(self) -> None: ...

    def _measure_round_trip(self, count: int = 3) -> None:
        """``count`` control-API round trips to the destination host, each a sample: a
        read of its job, which also carries the job writes the destination timed
        (``progress.persist_ms``).  A failed request ends the sampling."""
        tls = client_context(self.daemon.tls)
        client = HostClient(self.job.peer, self.daemon.token, timeout=5.0, tls=tls)
        peer_job = self.job.progress.get("peer_job")
        path = f"/v1/jobs/{peer_job}" if peer_job else "/v1/host"
        for _ in range(count):
            t0 = time.monotonic()
            try:
                reply = client.get(path)
            except (ApiError, HostError):
                return
            self.fixed.round_trip(time.monotonic() - t0)
            self._read_destination_times(reply)

    def _read_destination_times(self, reply: Any) -> None:
        progress = reply.get("progress") if isinstance(reply, dict) else None
        if not isinstance(progress, dict):
            return
        samples = progress.get("persist_ms")
        if isinstance(samples, list):
            self.fixed.destination_persists = [float(x) / 1e3 for x in samples if _number(x)]
        loads = progress.get("device_loads")
        if isinstance(loads, dict):  # {device: [ms, bytes]}: the last pre-copy chunk's load
            self.session.ack.last_loads = {
                str(d): (float(v[0]) / 1e3, int(v[1])) for d, v in loads.items()
                if isinstance(v, list) and len(v) == 2 and _number(v[0]) and _number(v[1])}

    def round_trip_s(self) -> float:
        """A round trip of the switchover's frames (LOADED, COMMIT, RESUMED): the kernel's
        RTT of the migration connection itself (TCP_INFO), which they cross.
        The control-API round trips are sampled again at the stop decision all the same
        (they read the destination's published times); their median stands in where
        the connection has no TCP RTT -- it is an HTTP request and a job's JSON, several
        times a frame's round trip (3-4 ms against 0.01 ms on loopback here)."""
        self._measure_round_trip()
        return self._connection_rtt()

    def _connection_rtt(self) -> float:
        rtt = tcp_rtt_s(self.ch.link.sock) if self.ch is not None \
            and isinstance(self.ch.link, SocketLink) else None  # fmt: skip
        return rtt if rtt is not None else self.fixed.round_trip_s()

    def quiet(self) -> None:
        """Between two passes (the guest running, the pass's pages handed out): one more
        sample of a job write and of a round trip."""
        self._time_persist()
        self._measure_round_trip(1)

    def _quiet_samples(self) -> None:
        """Job writes timed before the stream, nothing else running for this migration:
        the switchover is as quiet (the guest paused, the links drained), more so than
        the decision, whose writes meet the destination still applying the pass (4-5 ms
        a write there against 1-2 ms at the switchover, in a one-pass migration whose
        only samples they were).  The destination times its own the same way."""
        for _ in range(DECISION_SAMPLES):
            self._time_persist()

    def _time_persist(self) -> None:
        t0 = time.monotonic()
        self.daemon.save_job(self.job)
        self.fixed.persisted(time.monotonic() - t0)

    def bandwidth_bps(self) -> float:
        return _LINK_BANDWIDTH.get(self.job.peer, 0.0)

    def _remember_bandwidth(self) -> None:
        measured = self.session.stats.link_bandwidth_bps
        if measured > _LINK_BANDWIDTH.get(self.job.peer, 0.0):
            _LINK_BANDWIDTH[self.job.peer] = measured

    def _fixed_key(self) -> tuple[str, tuple[str, ...]]:
        return (self.job.peer, device_kinds(self.session.vm.handlers.values()))

    def _recall_switchover(self) -> None:
        """The fixed switchover costs the last migrations to this destination paid."""
        key = self._fixed_key()
        self.fixed.measured = list(_SWITCHOVER_FIXED.get(key, []))
        self.session.meter.remembered_stop_s = median(_STOP_FIXED.get(key, [0.0]))

    def _remember_switchover(self, stats: MigrationStats) -> None:
        """This migration's switchover as measured: after the stream (the destination's
        load without its wait for the data channels' last bytes, which is a drain) less
        the round trips themselves (the prediction has them apart); and the stop (the
        guest paused, the dirty log read and stopped) less the devices' quiesce, which
        is predicted apart."""
        down, parts = stats.downtime, stats.switchover_parts
        rtt = self._connection_rtt()
        paid = (down.round_trips_ms + down.load_ms + down.adopt_ms) / 1e3 \
            - SWITCHOVER_ROUND_TRIPS * rtt  # fmt: skip
        stop = (parts.get("pause_ms", 0.0) + parts.get("dirty_log_ms", 0.0)
                - stats.predicted.get("device_stop_ms", 0.0)) / 1e3
        _remember(_SWITCHOVER_FIXED, self._fixed_key(), max(paid, 0.0))
        _remember(_STOP_FIXED, self._fixed_key(), max(stop, 0.0))

    def _device_rate_key(self) -> tuple[str, tuple[str, ...], bool]:
        over_channels = self.session.device_sink is not None \
            and self.session.ram_sink is not None  # fmt: skip
        return (self.job.peer, device_kinds(self.session.vm.handlers.values()), over_channels)

    def _recall_device_rate(self) -> None:
        """The stop-copy device rate earlier migrations to this destination measured for
        the same kinds of devices on the same path (the median of the last few), for the
        prediction; call once the path is known (the data channels opened or not)."""
        self.session.meter.remembered_device_s_per_byte = median(
            _STOP_DEVICE_RATE.get(self._device_rate_key(), [0.0]))

    def _remember_device_rate(self) -> None:
        measured = self.session.meter.stop_device_s_per_byte
        if measured > 0:
            _remember(_STOP_DEVICE_RATE, self._device_rate_key(), measured)

    def in_flight_bytes(self) -> int:
        """Unsent and unacknowledged bytes in our send queue (SIOCOUTQ) plus, when that
        queue is not empty (the destination is behind), its full receive buffer."""
        main = self._main_queued()
        return main + (RECEIVE_BUFFER if main > 0 else 0) + self._channels_queued()

    def settle(self) -> None:
        """Before the stop, the guest running: wait until every byte handed to the main
        connection and the data channels has left the send queues (SIOCOUTQ: taken by
        the destination's socket), at most ``SETTLE_BOUND_S``.  What then remains unapplied
        at the destination is at most its receive buffers, not a full send queue."""
        end = time.monotonic() + SETTLE_BOUND_S
        while self._queued_raw() > 0 and time.monotonic() < end:
            self._check_cancel()
            time.sleep(SETTLE_POLL_S)

    def _queued_raw(self) -> int:
        return self._main_queued() + self._channels_queued()

    def _main_queued(self) -> int:
        return self.ch.link.queued() if self.ch is not None else 0

    def _channels_queued(self) -> int:
        return self.channels.in_flight_bytes() if self.channels is not None else 0

    def fixed_switchover_s(self) -> float:
        """Job writes timed now, at the stop decision (between passes, the links quiet, as
        at the switchover; a write timed while the pages stream costs several times more
        here), with those timed after earlier passes: the median write times the writes
        with the guest paused on both hosts (the destination's own, as it timed them),
        plus the destination's load and adopt (:class:`FixedCosts`)."""
        for _ in range(DECISION_SAMPLES):
            self._time_persist()
        return self.fixed.switchover_s()


def _remember(table: dict[K, list[float]], key: K, value: float) -> None:
    """Keep ``value`` as the newest of the last :data:`REMEMBERED_SAMPLES` of ``key``."""
    samples = table.setdefault(key, [])
    samples.append(value)
    del samples[:-REMEMBERED_SAMPLES]


def _number(x: object) -> bool:
    """A non-negative JSON number (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and x >= 0
