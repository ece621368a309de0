"""The downtime predicted at the stop decision, sans-IO: what the host measures about
the link (:class:`LinkProbe`), what this migration's pre-copy measured
(:class:`PrecopyMeter`) and how the parts are added up (:meth:`PrecopyMeter.predict`).

Every part comes from a quantity measured during this migration, timed where it
happens: the cost per page of the last pass that sent enough pages to measure it (over
the channel count this migration uses), apart for pages in long runs (RAM_PAGES) and
scattered pages (RAM_SCATTER lists, about twice the cost of a page here), the rate at
which device state was read and sent in pre-copy, stopping the guest and reading the dirty log
(timed in every pass), the last pass's dirty rate, the rate at which RAM is hashed when
verification is on (a slice is timed), the host's turnaround for a small batch (the
state's last batch and END are one), and on the host side the bytes in flight, a round
trip and its own persists.  Device state without pre-copy, which nothing can read before
the stop, moves at the rate an earlier migration's stop measured for the same kinds of
devices to the same destination; see docs/performance.md.  The parts are a dict, so a term (a
device's load time measured in pre-copy, say) is one more key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.clock import Clock
from vmferry.machine.handlers import DeviceData, MigrationHandler, StatePiece
from vmferry.machine.ram import GuestRam
from vmferry.migration.context import MigrationStats
from vmferry.migration.multichannel import SCATTER_BELOW

#: the switchover after the last byte: END -> LOADED -> COMMIT -> RESUMED
SWITCHOVER_ROUND_TRIPS = 1.5
#: the longest the host waits before the stop, the guest running, for the destination to
#: take what was sent (``LinkProbe.settle``): bytes in flight beyond it drain paused
SETTLE_BOUND_S = 1.0
#: a pass that sent fewer non-zero pages than this does not measure the cost of a page
#: (its time is the pass's own overhead: the held guest, PASS_END, the channels' SYNC)
MEASURABLE_PAGES = 256
#: the slice of guest RAM hashed once, in pre-copy, to measure the hashing rate
DIGEST_SLICE = 16 * 1024 * 1024
#: below this share of scattered pages a pass measures the cost of a page in long runs
BULK_SHARE = 0.1
#: pre-copy device data below this many bytes does not measure the device's rate
MEASURABLE_DEVICE_BYTES = 1 << 20


def device_bytes(pieces: Iterable[StatePiece]) -> int:
    """The bytes of device data among ``pieces``."""
    return sum(len(p.data) for p in pieces if isinstance(p, DeviceData))


def device_kinds(handlers: Iterable[MigrationHandler]) -> tuple[str, ...]:
    """The kinds (drivers) of the devices of ``handlers``: a stop-copy device rate is
    remembered per kinds."""
    return tuple(sorted(k for h in handlers for k in h.device_kinds()))


def scattered_share(mask: npt.NDArray[np.bool_]) -> float:
    """The share of the pages of ``mask`` that go as scattered pages (in runs shorter
    than ``SCATTER_BELOW``, which the main stream and the data channels alike send in
    RAM_SCATTER lists): 0.0 for an empty mask."""
    total = int(np.count_nonzero(mask))
    if total == 0 or (total == mask.size and total >= SCATTER_BELOW):  # one long run
        return 0.0
    edges = np.flatnonzero(np.diff(mask.view(np.int8), prepend=0, append=0))
    lengths = edges[1::2] - edges[::2]  # each run: its start and the page after it
    return float(lengths[lengths < SCATTER_BELOW].sum()) / total


class LinkProbe(Protocol):
    """What the host measures about the link, for the downtime prediction."""

    def in_flight_bytes(self) -> int:
        """Bytes handed to the link that the destination has not consumed yet."""
        ...

    def round_trip_s(self) -> float:
        """One request-reply round trip to the destination host, measured."""
        ...

    def bandwidth_bps(self) -> float:
        """Bytes per second measured on this link before (0.0: never)."""
        ...

    def fixed_switchover_s(self) -> float:
        """What the switchover costs beyond moving bytes, as measured here: the host's
        own bookkeeping with the guest paused (persisting the job's steps) and the
        destination's load and resume as the last migration to it reported them."""
        ...

    def quiet(self) -> None:
        """Called between two passes that are not the last (the guest running, the
        pass's pages handed out): a quiet moment to sample the fixed costs."""
        ...

    def settle(self) -> None:
        """Just before the stop, with the guest still running: wait (bounded) until the
        destination has taken what was already sent, so that its receive backlog is not
        drained with the guest paused."""
        ...


#: job writes with the guest paused: the source's commit step (its transfer steps are only
#: published then), and on the destination its resume step, then in its adopt the VM's
#: record and the completed status
SOURCE_PAUSED_PERSISTS = 1
DESTINATION_PAUSED_PERSISTS = 3
#: the samples of each fixed cost kept (the median of them counts)
FIXED_SAMPLES = 9


def _median(samples: list[float]) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _keep(samples: list[float], seconds: float) -> None:
    if seconds >= 0:
        samples.append(seconds)
        del samples[:-FIXED_SAMPLES]


@dataclass
class FixedCosts:
    """The switchover's fixed costs, from several samples each, taken at quiet moments of
    pre-copy (between passes, at the decision; a sample taken while pages stream costs
    several times more here), and the median of them used: one sample that stalled
    (a job write held up by the disk, a round trip by the scheduler) no longer swings the
    prediction several-fold.  Fed by the host (sans-IO here)."""

    #: one job write on the source, seconds
    persists: list[float] = field(default_factory=list)
    #: one control-API round trip to the destination, seconds
    round_trips: list[float] = field(default_factory=list)
    #: one job write on the destination, as it timed its own (it reports them)
    destination_persists: list[float] = field(default_factory=list)
    #: what the switchover after the stream paid in the last migrations to the same
    #: destination with devices of the same kinds (given by the host): the exchange
    #: LOADED -> COMMIT -> RESUMED beyond its round trips, with both hosts' writes in
    #: it, the destination's load and its adopt (with its two writes), seconds each;
    #: empty: no such migration yet
    measured: list[float] = field(default_factory=list)

    def persisted(self, seconds: float) -> None:
        _keep(self.persists, seconds)

    def round_trip(self, seconds: float) -> None:
        _keep(self.round_trips, seconds)

    def destination_persisted(self, seconds: float) -> None:
        _keep(self.destination_persists, seconds)

    def round_trip_s(self) -> float:
        return _median(self.round_trips)

    def switchover_s(self) -> float:
        """The job writes with the guest paused on both hosts and the destination's load
        and adopt: as the last migrations to the destination paid them (the median of
        :attr:`measured`: every part of it measured at a real switchover, where a write
        sampled in pre-copy is either quieter -- before the stream -- or busier -- at the
        decision, the destination still applying -- than the switchover's).  Without
        such a migration: the writes at the medians sampled here (the destination's own,
        or else the source's), the destination's adopt its two writes."""
        if self.measured:
            return _median(self.measured)
        persist = _median(self.persists)
        destination = _median(self.destination_persists) if self.destination_persists \
            else persist  # fmt: skip
        return SOURCE_PAUSED_PERSISTS * persist + DESTINATION_PAUSED_PERSISTS * destination


@dataclass
class PrecopyMeter:
    """What this migration's pre-copy measured, for the prediction at the stop decision.
    The session reports each quantity where it is timed (:meth:`stopped`, :meth:`synced`,
    :meth:`sent`); only hashing a slice of RAM (:meth:`time_digest`) is timed here."""

    clock: Clock
    page_size: int
    npages: int
    #: stopping the guest (a decaying maximum over the passes)
    stop_s: float = 0.0
    #: one read of the dirty log (the last pass's)
    sync_s: float = 0.0
    #: stopping the guest and the final read and stop of the dirty log as the last
    #: migrations to the same destination paid them at their switchovers (the host's;
    #: the devices' quiesce taken out), seconds; 0.0: none.  Pre-copy's stops are not
    #: the real one on KVM (they hold the runner, the vCPU threads run on) and no pass
    #: stops dirty logging
    remembered_stop_s: float = 0.0
    #: seconds per non-zero page in long runs (RAM_PAGES), as the last pass that sent
    #: enough of them measured it (zero pages are cheap: they are counted free); 0.0: not
    #: measured
    page_cost_s: float = 0.0
    #: seconds per non-zero scattered page (RAM_SCATTER lists: a dirtying guest's later
    #: passes and its final pass), measured apart; 0.0: not measured
    scatter_cost_s: float = 0.0
    #: seconds per byte of device state read, encoded and sent, as pre-copy measured
    #: (device data sent while the guest ran); 0.0: not measured
    device_s_per_byte: float = 0.0
    #: seconds per byte of device state read and sent with the guest stopped, as this
    #: migration's stop measured it (the host remembers it); 0.0: not measured
    stop_device_s_per_byte: float = 0.0
    #: the same, as earlier migrations to the same destination with devices of the same
    #: kinds on the same path measured it (the median of the last few; given by the
    #: host): the rate of device state that has no pre-copy, which nothing can read
    #: before the stop; 0.0: none
    remembered_device_s_per_byte: float = 0.0
    #: bytes of guest RAM hashed per second (verification); 0.0: not measured
    digest_bps: float = 0.0
    #: the share of scattered pages the last prediction assumed for the final pass
    final_scattered: float = 0.0
    #: a stop was put off once for a pass to measure scattered pages (:meth:`unmeasured`)
    waited_for_scatter: bool = False
    #: the host sending a small batch (a pass's PASS_END) and asking for the next one, as
    #: the state's last batch and END are sent at the stop (samples; the median counts)
    handoffs: list[float] = field(default_factory=list)
    #: the CPUs the running guest used during the pass that measured ``page_cost_s``
    #: and ``scatter_cost_s`` (CPU seconds per second; the final pass runs without it)
    page_guest_cpu: float = 0.0
    scatter_guest_cpu: float = 0.0
    #: CPU seconds the guest used so far (the host's; None: not measured)
    guest_cpu: Callable[[], float] | None = None
    _cpu0: float | None = None
    #: when the last dirty log was read (the clock's time): the guest dirties pages from
    #: there until it is stopped
    synced_at: float | None = None

    def stopped(self, seconds: float) -> None:
        self.stop_s = max(self.stop_s * 0.5, seconds)

    def synced(self, seconds: float) -> None:
        self.sync_s = seconds
        self.synced_at = self.clock.monotonic()

    def handed_off(self, seconds: float) -> None:
        _keep(self.handoffs, seconds)

    def state_overhead_s(self) -> float:
        """What the state part costs beyond its bytes: its last batch and END handed to the
        host, as pre-copy's small batches measured it."""
        return _median(self.handoffs)

    def sending(self) -> float:
        """A pass starts sending its pages: returns the time, and notes the guest's CPU
        time (``guest_cpu``) for :meth:`sent`."""
        self._cpu0 = self.guest_cpu() if self.guest_cpu is not None else None
        return self.clock.monotonic()

    def sent(self, seconds: float, normal_pages: int, scattered: float = 0.0,
             guest_cpu: float | None = None) -> None:
        """A pass's pages went out in ``seconds`` (``normal_pages`` of them not zero;
        ``scattered``: the share of the pass's pages that were scattered, see
        :func:`scattered_share`).  A pass of long runs measures the cost of such a page;
        a pass of scattered pages, with the long runs' share at their measured cost
        taken out, the cost of a scattered page.  ``guest_cpu``: the CPUs the running
        guest used meanwhile (CPU seconds per second; by default from ``guest_cpu``
        since :meth:`sending`), kept with the cost measured."""
        if guest_cpu is None:
            guest_cpu = (self.guest_cpu() - self._cpu0) / seconds if self.guest_cpu \
                is not None and self._cpu0 is not None and seconds > 0 else 0.0  # fmt: skip
        if normal_pages < MEASURABLE_PAGES or seconds <= 0:
            return
        n_scattered = normal_pages * scattered
        if scattered < BULK_SHARE or n_scattered < MEASURABLE_PAGES:
            self.page_cost_s = seconds / normal_pages
            self.page_guest_cpu = guest_cpu
            return
        n_runs = normal_pages - n_scattered
        if self.page_cost_s > 0:
            rest = seconds - n_runs * self.page_cost_s
            if rest > 0:
                self.scatter_cost_s = rest / n_scattered
                self.scatter_guest_cpu = guest_cpu
        elif scattered >= 1 - BULK_SHARE:
            self.scatter_cost_s = seconds / normal_pages
            self.scatter_guest_cpu = guest_cpu

    def unmeasured(self, dirty: npt.NDArray[np.bool_] | None) -> bool:
        """Whether the final pass would send pages ``dirty`` of a kind no pass measured:
        enough scattered pages to cost something, and no scattered pass yet (a decision
        right after the bulk first pass; scattered pages cost about twice a page in a
        run here).  One more pass then sends them, measures their cost and leaves the
        final pass fewer (once: a pass that could not measure them is not repeated)."""
        if dirty is None or self.scatter_cost_s > 0 or self.waited_for_scatter:
            return False
        share = scattered_share(dirty)
        self.waited_for_scatter = share >= BULK_SHARE \
            and share * int(np.count_nonzero(dirty)) >= MEASURABLE_PAGES  # fmt: skip
        return self.waited_for_scatter

    def device_sent(self, seconds: float, nbytes: int) -> None:
        """Pre-copy device data (``nbytes``) was read from the devices, encoded and sent
        in ``seconds``: the rate the stop-copy device state moves at."""
        if nbytes >= MEASURABLE_DEVICE_BYTES and seconds > 0:
            self.device_s_per_byte = seconds / nbytes

    def stop_device_timed(self, parts: dict[str, float], nbytes: int, final_pages: int,
                          over_channels: bool, drain_ms: float) -> None:  # fmt: skip
        """The device state read and sent with the guest stopped (``nbytes``), from the
        switchover's timed ``parts`` (ms), for the host to remember: in the main stream,
        the handlers' state read, encoded and handed to the host (the destination loads
        it as it arrives); over the data channels, the devices read (staged), the final
        pass beyond its ``final_pages`` pages at their measured cost, and the
        destination's wait for the channels' last bytes (``drain_ms``: it loads the
        device chunks there, after the main stream)."""
        if over_channels:
            measured = self.page_cost_s > 0 or self.scatter_cost_s > 0
            pages_ms = final_pages * self.page_s(self.final_scattered, 1.0) * 1e3 \
                if measured else 0.0  # fmt: skip
            ms = parts["device_staged_ms"] + max(0.0, parts["pages_ms"] - pages_ms) + drain_ms
        else:
            ms = parts["handlers_ms"] + parts["last_handoff_ms"]
        self.stop_device_sent(ms / 1e3, nbytes)

    def stop_device_sent(self, seconds: float, nbytes: int) -> None:
        """``nbytes`` of device state were read and sent with the guest stopped in
        ``seconds``."""
        if nbytes >= MEASURABLE_DEVICE_BYTES and seconds > 0:
            self.stop_device_s_per_byte = seconds / nbytes

    def device_load_ms(self, load_ms: float, state_ms: float, main_stream: bool) -> float:
        """How much the destination's loading of the stop-copy device state (``load_ms``,
        at the rate it measured in pre-copy) adds to ``state_ms``.  In the main stream it
        loads each chunk as it arrives, and the rate measured for device state in
        pre-copy already ran at the pace of the slower of sending and loading: with that
        rate measured the device term is the larger of the two, not their sum.  Over the
        data channels the destination loads the chunks after the main stream ended: the
        load adds."""
        if main_stream and self.device_s_per_byte > 0:
            return max(0.0, load_ms - state_ms)
        return load_ms

    def page_s(self, scattered: float, bandwidth: float) -> float:
        """The cost of one page of a pass whose pages are ``scattered`` (share) scattered:
        each kind at its measured cost (one measured stands in for the other; neither:
        a page's bytes at ``bandwidth``)."""
        runs = self.page_cost_s or self.scatter_cost_s
        scatter = self.scatter_cost_s or self.page_cost_s
        if not runs:
            return self.page_size / max(bandwidth, 1.0)
        return scattered * scatter + (1 - scattered) * runs

    def inputs(self) -> dict[str, float]:
        """The measured rates the last prediction used, for the job's statistics: the
        cost of a page in long runs and of a scattered page (us), the share of scattered
        pages assumed for the final pass (%), device state read and sent (MB/s)."""
        return {"page_cost_us": self.page_cost_s * 1e6,
                "scatter_cost_us": self.scatter_cost_s * 1e6,
                "final_scattered_pct": self.final_scattered * 100,
                "device_mbps": 1e-6 / self.device_s_per_byte if self.device_s_per_byte else 0.0,
                "remembered_device_mbps": 1e-6 / self.remembered_device_s_per_byte
                if self.remembered_device_s_per_byte else 0.0,
                "page_guest_cpu_pct": self.page_guest_cpu * 100,
                "scatter_guest_cpu_pct": self.scatter_guest_cpu * 100,
                "handoff_ms": _median(self.handoffs) * 1e3}

    def record(self, stats: MigrationStats, link: LinkProbe | None, dirty_pages: int,
               dirty_rate: float, state_bytes: int, bandwidth: float, verify: GuestRam | None,
               dirty: npt.NDArray[np.bool_] | None, device_load: Callable[[], float],
               main_stream: bool, device_stop_s: float = 0.0) -> None:  # fmt: skip
        """At the stop decision: the prediction (:meth:`predict`, ``dirty`` the final
        pass's pages) with the destination's device loads (``device_load()`` ms, asked
        once the decision's round trips read what the destination published; see
        :meth:`device_load_ms`) and the devices' stop (``device_stop_s``: the save each
        device's stop runs, as pre-copy timed it; the handlers' ``stop_cost_s``), into
        ``stats`` with the rates it rested on."""
        p = self.predict(link, dirty_pages, dirty_rate, state_bytes, bandwidth, verify,
                         scattered_share(dirty) if dirty is not None else 0.0)
        p["device_load_ms"] = self.device_load_ms(device_load(), p["state_ms"], main_stream)
        p["device_stop_ms"] = device_stop_s * 1e3
        stats.predicted = p
        stats.predicted_downtime_ms = sum(p.values())
        stats.prediction_inputs = self.inputs()

    def time_digest(self, ram: GuestRam) -> None:
        """Hash a slice of ``ram`` as verification hashes all of it, and keep the rate."""
        n = min(DIGEST_SLICE, ram.size)
        t0 = self.clock.monotonic()
        xxhash.xxh3_128(ram.view(0, n)).digest()
        seconds = self.clock.monotonic() - t0
        self.digest_bps = n / seconds if seconds > 0 else 0.0

    def final_pages(self, dirty_pages: int, dirty_rate: float, until_stop_s: float) -> int:
        """The final pass: the pages dirty at the decision and those the guest dirties at
        the last pass's rate until it is stopped, at most every page."""
        return min(self.npages, dirty_pages + round(dirty_rate * max(until_stop_s, 0.0)))

    def predict(self, link: LinkProbe | None, dirty_pages: int, dirty_rate: float,
                state_bytes: int, bandwidth: float, verify: GuestRam | None = None,
                scattered: float = 0.0) -> dict[str, float]:  # fmt: skip
        """The downtime's parts (ms) at the stop decision.  ``dirty_pages`` and
        ``dirty_rate`` (pages/s): what the last pass found; ``state_bytes``: device and
        component state still to send; ``bandwidth``: bytes/s the last pass measured;
        ``verify``: the guest's RAM when verification will hash it with the guest paused
        (a slice of it is hashed now, once, to measure the rate); ``scattered``: the share
        of the dirty pages that are scattered (the final pass sends them so)."""
        if verify is not None and self.digest_bps == 0.0:
            self.time_digest(verify)
        bw = max(bandwidth, 1.0)
        in_flight = link.in_flight_bytes() if link is not None else 0
        rtt = link.round_trip_s() if link is not None else 0.0
        fixed = link.fixed_switchover_s() if link is not None else 0.0
        # the guest dirties pages from the dirty log's read until it is stopped: this
        # decision (its samples of the fixed costs), the host letting what is in flight
        # reach the destination, and stopping it
        since_sync = self.clock.monotonic() - self.synced_at if self.synced_at is not None \
            else 0.0  # fmt: skip
        pages = self.final_pages(dirty_pages, dirty_rate,
                                 since_sync + in_flight / bw + self.stop_s)
        self.final_scattered = scattered
        page_s = self.page_s(scattered, bw)
        state_s_per_byte = self.device_s_per_byte or self.remembered_device_s_per_byte \
            or 1 / bw  # fmt: skip
        verify_s = (self.npages * self.page_size / self.digest_bps
                    if verify is not None and self.digest_bps > 0 else 0.0)
        return {
            "final_ram_ms": pages * page_s * 1e3,
            "state_ms": (state_bytes * state_s_per_byte + self.state_overhead_s()) * 1e3,
            # the host's settle() lets what is in flight drain with the guest running,
            # for at most SETTLE_BOUND_S: only what it cannot wait out is downtime
            "in_flight_ms": max(0.0, in_flight / bw - SETTLE_BOUND_S) * 1e3,
            "switchover_ms": SWITCHOVER_ROUND_TRIPS * rtt * 1e3,
            "stop_ms": (self.remembered_stop_s or self.stop_s + self.sync_s) * 1e3,
            # the hosts' bookkeeping and the destination's load and resume (measured)
            "fixed_ms": fixed * 1e3,
            # the destination hashes its RAM before LOADED (the source meanwhile)
            "verification_ms": verify_s * 1e3,
        }
