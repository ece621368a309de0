"""The source side of a live migration, sans-IO.

Theory of operation
-------------------
:class:`SourceSession` turns a running VM into stream buffers.  The host drives it::

    send(session.start())
    while bufs := session.next_buffers():      # [] once END has been produced
        sleep(session.pacing_delay()); send(bufs)
    stats = session.complete(ack)              # the destination's RESUMED message
    # on any error instead: session.fail(step, reason)  -> source VM running again

Inside, a generator walks the phases as QEMU's pre-copy does: SETUP (stream header, VM
configuration, dirty logging on) -> ACTIVE (pass 1 sends every page, later passes send
what the dirty log caught; after each pass the bandwidth and dirty rate are measured and
:func:`vmferry.migration.precopy.decide` chooses: iterate, throttle, or switch over) ->
DEVICE (vCPUs paused: final dirty pages, vCPU registers, component state, END) ->
COMPLETED once the destination acknowledges its resume.

RAM goes out in runs of at most ``run_pages`` pages (4 MiB at most): all-zero pages
become RAM_ZERO runs (coalesced across runs), the rest RAM_PAGES records.  A running
guest may write a page while it is being sent, so each run is first copied into a bounce
buffer and the copy is checksummed and sent: the bytes on the wire always match their
checksum, and the write itself re-dirties the page for the next pass.  The bounce buffer
is reused, so the host must send each batch before asking for the next -- which it must
anyway: the clock readings between calls are what bandwidth is measured from.

The source VM is never lost: until :meth:`complete` it stays intact, and :meth:`fail`
stops dirty logging, lifts the throttle and resumes the vCPUs if the session paused them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Generator, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from vmferry.clock import Clock
from vmferry.errors import ConfigError, MigrationError, StreamUsageError
from vmferry.machine.handlers import ArchState, DeviceData, StatePiece
from vmferry.machine.vm import VM
from vmferry.migration.channelsend import RamSink
from vmferry.migration.context import (
    Downtime,
    MigrationStats,
    PassRecord,
    Status,
    after_stream,
    digest_report,
    state_digests,
)
from vmferry.migration.devicestate import AckGate, DeviceSink, stage_device_state
from vmferry.migration.multichannel import SCATTER_BELOW
from vmferry.migration.precopy import ConvergencePolicy, decide
from vmferry.migration.prediction import LinkProbe, PrecopyMeter, device_bytes, scattered_share
from vmferry.migration.runs import BATCH_BYTES, Batch, expand, page_runs, split
from vmferry.migration.stream import (
    ComponentRecord,
    DeviceChunk,
    End,
    PassEnd,
    RamPages,
    RamScatter,
    RamZero,
    StreamEncoder,
    VcpuRecord,
    VmConfig,
)
from vmferry.migration.stream.records import ARCH_RECORDS, Buffer, Record

MIB = 1024 * 1024
MAX_RUN_BYTES = 4 * MIB


class GuestControl(Protocol):
    """How the session stops and starts the guest (the host adds its own locking)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def set_throttle(self, pct: int) -> None: ...

    def held(self) -> AbstractContextManager[object]:
        """Guest time stands still inside (handler hooks that overlap a running guest,
        such as device pre-copy, run here)."""
        ...


#: a pass that moved fewer bytes than this does not measure the link's bandwidth
MEASURABLE_BYTES = 16 * MIB


class DirectControl:
    """GuestControl straight on a VM (single-threaded use and tests)."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm

    def pause(self) -> None:
        self.vm.pause()

    def resume(self) -> None:
        self.vm.start()

    def set_throttle(self, pct: int) -> None:
        self.vm.workload.set_throttle(pct)

    def held(self) -> AbstractContextManager[object]:
        return contextlib.nullcontext()


@dataclass(frozen=True)
class MigrationParams:
    downtime_limit_ms: float = 300.0
    #: MiB/s, as virsh migrate-setspeed; None: unlimited
    max_bandwidth_mib: float | None = None
    offline: bool = False
    max_passes: int = 5
    auto_converge: bool = True
    verify: bool = False
    run_pages: int = 1024
    #: "preflight": refuse before anything moves what the destination cannot take;
    #: "qemu": no pre-flight, failures surface while the destination loads (as QEMU)
    compat: str = "preflight"
    allow_degraded: bool = False

    def __post_init__(self) -> None:
        if self.compat not in ("preflight", "qemu"):
            raise ConfigError(f"compat {self.compat!r} is not preflight or qemu")
        if self.max_bandwidth_mib is not None and self.max_bandwidth_mib <= 0:
            raise ConfigError("max bandwidth must be positive")
        if not 1 <= self.run_pages <= 4096:
            raise ConfigError("run_pages must be in [1, 4096]")

    def policy(self) -> ConvergencePolicy:
        return ConvergencePolicy(
            downtime_limit_s=self.downtime_limit_ms / 1e3,
            max_passes=self.max_passes,
            auto_converge=self.auto_converge,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "downtime_limit_ms": self.downtime_limit_ms,
            "max_bandwidth_mib": self.max_bandwidth_mib,
            "offline": self.offline,
            "max_passes": self.max_passes,
            "auto_converge": self.auto_converge,
            "verify": self.verify,
            "compat": self.compat,
            "allow_degraded": self.allow_degraded,
        }


class SourceSession:
    """One outgoing migration of ``vm`` (see the module docstring)."""

    def __init__(
        self,
        vm: VM,
        params: MigrationParams,
        clock: Clock,
        guest: GuestControl | None = None,
        extra_config: Mapping[str, Any] | None = None,
        link: LinkProbe | None = None,
    ) -> None:
        self.vm = vm
        self.link = link
        self.params = params
        self.clock = clock
        self.guest = guest if guest is not None else DirectControl(vm)
        self.extra_config = dict(extra_config or {})
        self.policy = params.policy()
        self.stats = MigrationStats(ram_total=vm.ram.size, ram_page_size=vm.ram.page_size,
                                    dirty_tracking=vm.ram.dirty_tracking)
        self.encoder = StreamEncoder()
        self._gen: Generator[list[Buffer], None, None] | None = None
        self._was_running = vm.running
        self._paused_by_us = False
        self._t0 = 0.0
        self._t_active = 0.0
        self._t_pause = 0.0
        self._t_final_ram = 0.0
        self._t_end = 0.0
        self._t_loaded = 0.0
        self._zero_run: tuple[int, int] | None = None
        self._pass_normal = 0
        self._pass_duplicate = 0
        self._run_pages = min(params.run_pages, MAX_RUN_BYTES // vm.ram.page_size)
        self._bounce = np.empty(BATCH_BYTES + MAX_RUN_BYTES, dtype=np.uint8)
        self._bounce_used = 0
        self.source_digests: dict[str, str] = {}
        #: the bandwidth cap is measured from here (moved when the cap changes)
        self._pace_from: tuple[float, int] | None = None
        self.source_digest_ms = 0.0
        #: parallel data channels for RAM (None: RAM goes in the main stream)
        self.ram_sink: RamSink | None = None
        #: bytes the data channels sent so far (the sink adds to it while it sends)
        self.channel_bytes = 0
        #: what the pre-copy measured, for the downtime predicted at the stop decision
        self.meter = PrecopyMeter(clock, vm.ram.page_size, vm.ram.npages)
        #: stop-copy device state over the data channels (None: in the main stream)
        self.device_sink: DeviceSink | None = None
        #: switchover-ack (the host enables it when the destination speaks it)
        self.ack = AckGate()
        #: the device state moved at the stop: bytes, final pages, over the channels
        self._stop_device: tuple[int, int, bool] = (0, 0, False)

    @property
    def bytes_out(self) -> int:
        """Bytes of the main stream and the data channels."""
        return self.encoder.bytes_out + self.channel_bytes

    # --- driving ---------------------------------------------------------------------

    @property
    def status(self) -> Status:
        return self.stats.status

    @property
    def guest_paused(self) -> bool:
        """Whether this session paused the guest (it is in downtime until COMMIT)."""
        return self._paused_by_us

    def preflight(self, destination: Mapping[str, Any] | None) -> list[str]:
        """Ask every handler before anything moves (``destination``: the destination's
        capabilities per handler).  Raises MigrationRefused; returns warnings."""
        options = {"compat": self.params.compat, "allow_degraded": self.params.allow_degraded}
        warnings: list[str] = []
        for name, h in self.vm.handlers.items():
            caps = None if destination is None else destination.get(name)
            warnings += h.preflight(caps, options)
        self.stats.warnings = warnings
        return warnings

    def start(self) -> list[Buffer]:
        if self._gen is not None:
            raise StreamUsageError("migration already started")
        self._t0 = self.clock.monotonic()
        self._gen = self._produce()
        return self._next()

    def next_buffers(self) -> list[Buffer]:
        """The next buffers to send; [] when END has been produced.  StreamUsageError once
        the session ended: a failed session never answers [] as if the stream were done."""
        if self._gen is None:
            raise StreamUsageError("start() first")
        if self.stats.status.finished:
            raise StreamUsageError(f"next_buffers() in status {self.stats.status.value}")
        return self._next()

    def _next(self) -> list[Buffer]:
        assert self._gen is not None
        try:
            return next(self._gen)
        except StopIteration:
            return []
        except BaseException as exc:  # the session failed: it says so from now on
            if not self.stats.status.finished:
                self.stats.error_step = self.current_step()
                self.stats.move(Status.FAILED)
                self.stats.error = f"{type(exc).__name__}: {exc}"
            raise

    def pacing_delay(self) -> float:
        """Seconds to wait before sending more, to honour the bandwidth cap."""
        cap = self.params.max_bandwidth_mib
        if cap is None or self.stats.status is Status.SETUP:
            return 0.0
        t0, sent0 = self._pace_from or (self._t_active, 0)
        allowed = cap * MIB * (self.clock.monotonic() - t0)
        excess = self.bytes_out - sent0 - allowed
        return max(0.0, excess / (cap * MIB))

    def retune(self, changes: Mapping[str, Any]) -> None:
        """Change ``downtime_limit_ms`` and/or ``max_bandwidth_mib`` (None: unlimited)
        while the migration runs, as QMP ``migrate-set-parameters`` does: the decision at
        the end of the current pass and the pacing from now on use the new values.
        ConfigError for another key or a bad value (nothing changes then)."""
        unknown = set(changes) - {"downtime_limit_ms", "max_bandwidth_mib"}
        if unknown:
            raise ConfigError(f"cannot change {sorted(unknown)} during a migration")
        try:
            params = dataclasses.replace(self.params, **changes)
        except TypeError as exc:
            raise ConfigError(f"bad migration parameters: {exc}") from exc
        policy = dataclasses.replace(self.policy,
                                     downtime_limit_s=params.downtime_limit_ms / 1e3)
        if params.max_bandwidth_mib != self.params.max_bandwidth_mib:
            self._pace_from = (self.clock.monotonic(), self.bytes_out)
        self.params, self.policy = params, policy

    # --- the phases ------------------------------------------------------------------

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """``guest.held()``, timed: entering it stops the guest as the switchover will,
        so the pre-copy passes measure what stopping costs (a decaying maximum)."""
        t0 = self.clock.monotonic()
        with self.guest.held():
            self.meter.stopped(self.clock.monotonic() - t0)
            yield

    def _produce(self) -> Generator[list[Buffer], None, None]:
        ram = self.vm.ram
        config = {**self.vm.definition.to_dict(), **self.extra_config}
        if self.params.offline:
            self._pause_guest()
        else:
            ram.start_dirty_log()
        with self.guest.held():
            for h in self.vm.handlers.values():
                h.timed_by(self.clock)
                h.save_setup()
            self.ack.setup(self.vm.handlers.values(), self.params.offline)
        yield [self.encoder.header(), *self.encoder.encode(VmConfig(config))]
        self._t_active = self.clock.monotonic()
        self.stats.setup_time_ms = (self._t_active - self._t0) * 1e3
        self.stats.move(Status.ACTIVE)
        to_send: npt.NDArray[np.bool_] = np.ones(ram.npages, dtype=np.bool_)
        while True:
            t_pass = self.clock.monotonic()
            with self._held():
                pieces = [p for h in self.vm.handlers.values() for p in h.save_iterate()]
            if pieces:
                yield self._encode_pieces(pieces)
            self.meter.device_sent(self.clock.monotonic() - t_pass, device_bytes(pieces))
            scattered = scattered_share(to_send)
            t_send = self.meter.sending()
            yield from self._send_pages(to_send)
            self.meter.sent(self.clock.monotonic() - t_send, self._pass_normal, scattered)
            t_handoff = self.clock.monotonic()
            yield self.encoder.encode(PassEnd(len(self.stats.passes) + 1, int(to_send.sum())))
            self.meter.handed_off(self.clock.monotonic() - t_handoff)
            if self.params.offline:  # the guest is paused: one pass is all of it
                to_send = np.zeros(ram.npages, dtype=np.bool_)
                if self.ram_sink is not None:  # (nothing can be torn: any is damage)
                    to_send = self.ram_sink.owed_pages(to_send)
                self._end_of_pass(t_pass, 0)
                break
            t_sync = self.clock.monotonic()
            dirty = ram.get_dirty_log()
            self.meter.synced(self.clock.monotonic() - t_sync)
            self.stats.dirty_sync_count += 1
            to_send = dirty.bitmap
            if self.ram_sink is not None:  # torn records' pages go again
                to_send = self.ram_sink.owed_pages(to_send)
            if self._end_of_pass(t_pass, dirty.count, to_send):
                if self.ack.may_stop():
                    break
                if self.ack.all_sent():
                    yield from self._wait_for_ack()
        yield from self._switchover(to_send)

    def _end_of_pass(self, t_pass: float, dirty_pages: int,
                     dirty: npt.NDArray[np.bool_] | None = None) -> bool:  # fmt: skip
        """Record the pass (``dirty``: what the next pass sends); True to switch over."""
        now = self.clock.monotonic()
        seconds = max(now - t_pass, 1e-9)
        pass_bytes = self.bytes_out - sum(p.bytes for p in self.stats.passes)
        bandwidth = pass_bytes / seconds
        self.stats.link_bandwidth_bps = bandwidth if pass_bytes >= MEASURABLE_BYTES else 0.0
        if pass_bytes < MEASURABLE_BYTES and self.link is not None:
            # a pass this small measures the session's own overhead, not the link: a VM of
            # untouched RAM and a large device state would never converge on it
            bandwidth = max(bandwidth, self.link.bandwidth_bps())
        remaining = dirty_pages * self.vm.ram.page_size
        with self.guest.held():
            remaining += sum(h.pending_bytes() for h in self.vm.handlers.values())
            stop_bytes = sum(h.stop_copy_bytes() for h in self.vm.handlers.values())
            device_stop_s = sum(h.stop_cost_s() for h in self.vm.handlers.values())
        number = len(self.stats.passes) + 1
        d = decide(self.policy, number, remaining, bandwidth, self.stats.throttle_pct)
        if d.switchover and number < self.policy.max_passes and self.meter.unmeasured(dirty):
            d = dataclasses.replace(d, switchover=False)  # one more pass measures its pages
        if self.policy.give_up_after is not None and number >= self.policy.give_up_after:
            raise MigrationError(f"no convergence after {number} passes", f"ram pass {number}")
        self.stats.passes.append(
            PassRecord(
                number=number,
                pages=self._pass_normal + self._pass_duplicate,
                normal=self._pass_normal,
                duplicate=self._pass_duplicate,
                bytes=pass_bytes,
                seconds=seconds,
                dirty_pages=dirty_pages,
                mbps=bandwidth * 8 / 1e6,
                dirty_pages_rate=dirty_pages / seconds,
                expected_downtime_ms=min(d.expected_downtime_s, 1e9) * 1e3,
                throttle_pct=self.stats.throttle_pct,
                downtime_limit_ms=self.policy.downtime_limit_s * 1e3,
            )
        )
        self._pass_normal = self._pass_duplicate = 0
        self.stats.ram_remaining = remaining
        self.stats.ram_mbps = bandwidth * 8 / 1e6
        self.stats.ram_dirty_pages_rate = dirty_pages / seconds
        self.stats.expected_downtime_ms = min(d.expected_downtime_s, 1e9) * 1e3
        elapsed = max(now - self._t_active, 1e-9)
        sent_pages = self.stats.ram_normal + self.stats.ram_duplicate
        self.stats.ram_pages_per_second = sent_pages / elapsed
        if d.throttle_pct != self.stats.throttle_pct:
            self.stats.throttle_pct = d.throttle_pct
            self.guest.set_throttle(d.throttle_pct)
        if d.switchover and not self.params.offline:  # offline: all of it is downtime
            self.meter.record(self.stats, self.link, dirty_pages, dirty_pages / seconds,
                              remaining - dirty_pages * self.vm.ram.page_size, bandwidth,
                              self.vm.ram if self.params.verify else None, dirty,
                              lambda: self.ack.device_load_ms(stop_bytes),
                              self.device_sink is None or self.ram_sink is None, device_stop_s)
        elif self.link is not None and not self.params.offline:
            self.link.quiet()  # between passes: sample the fixed costs
        return d.switchover

    # --- switchover-ack ----------------------------------------------------------------

    def _wait_for_ack(self) -> Generator[list[Buffer], None, None]:
        """Every INIT_SENT marker went out but the destination has not acknowledged: yield
        [] with ``ack.awaiting`` set; the host waits for SWITCHOVER_ACK, hands it to
        :meth:`switchover_acknowledged` and asks for more (another pass)."""
        self.ack.awaiting = True
        yield []
        if self.ack.ack is None:
            raise StreamUsageError("next_buffers() while awaiting the switchover ack")

    def switchover_acknowledged(self, ack: Mapping[str, Any]) -> None:
        self.ack.acknowledged(ack, self.stats)  # every device's initial data is loaded

    def _switchover(self, to_send: npt.NDArray[np.bool_]) -> Generator[list[Buffer], None, None]:
        ram = self.vm.ram
        if not self.params.offline:
            if self.link is not None:
                self.link.settle()  # the destination catches up while the guest runs
            self._pause_guest()
            t = self.stats.timed("pause_ms", self._t_pause, self.clock.monotonic())
            to_send = to_send | ram.get_dirty_log().bitmap
            self.stats.dirty_sync_count += 1
            ram.stop_dirty_log()
            self.stats.timed("dirty_log_ms", t, self.clock.monotonic())
        self.stats.move(Status.DEVICE)
        device0, normal0 = self.stats.device_bytes, self.stats.ram_normal
        over_channels = self.device_sink is not None and self.ram_sink is not None
        t = self.clock.monotonic()
        staged = stage_device_state(self.vm.handlers.values(), self.device_sink, self.stats) \
            if over_channels and self.device_sink is not None else {}  # fmt: skip
        t = self.stats.timed("device_staged_ms", t, self.clock.monotonic())
        yield from self._send_pages(to_send)
        self._t_final_ram = self.stats.timed("pages_ms", t, self.clock.monotonic())
        state: list[Record] = [VcpuRecord(s.index, s.regs) for s in self.vm.save_vcpus()]
        out: list[Buffer] = []
        for rec in state:
            out += self.encoder.encode(rec)
        batch = Batch(out)
        t = self.stats.timed("vcpus_ms", self._t_final_ram, self.clock.monotonic())
        for h in self.vm.handlers.values():
            # large device states go out as they are read (or went over the channels)
            for piece in staged.get(h.name, h.save_complete()):
                if batch.add(self._encode_pieces([piece])):
                    yield self._ship(batch)
        batch.add(self.encoder.encode(End()))
        self.stats.ram_remaining = 0
        t = self.stats.timed("handlers_ms", t, self.clock.monotonic())
        yield self._ship(batch)
        self._t_end = self.stats.timed("last_handoff_ms", t, self.clock.monotonic())
        self._stop_device = (self.stats.device_bytes - device0,
                             self.stats.ram_normal - normal0, over_channels)

    def _pause_guest(self) -> None:
        self._t_pause = self.clock.monotonic()
        if self.vm.running:
            self.guest.pause()
            self._paused_by_us = True
        # devices stop their DMA before the final dirty sync reads the log
        for h in self.vm.handlers.values():
            h.quiesce()

    def _encode_pieces(self, pieces: list[StatePiece]) -> list[Buffer]:
        out: list[Buffer] = []
        for p in pieces:
            rec: Record
            if isinstance(p, DeviceData):
                rec = DeviceChunk(p.device, p.phase, p.seq, p.data)
                self.stats.device_bytes += len(p.data)
                self.ack.count(p)
            elif isinstance(p, ArchState):
                rec = ARCH_RECORDS[p.kind](p.data)
            else:
                rec = ComponentRecord(p.name, p.data)
            out += self.encoder.encode(rec)
        return out

    # --- RAM runs --------------------------------------------------------------------

    def _send_pages(self, mask: npt.NDArray[np.bool_]) -> Generator[list[Buffer], None, None]:
        if self.ram_sink is not None:
            number = len(self.stats.passes) + 1
            counts = self.ram_sink.send_pass(number, mask, self.stats.status is Status.DEVICE)
            ps = self.vm.ram.page_size
            self.stats.ram_normal += counts.normal
            self.stats.ram_normal_bytes += counts.normal * ps
            self.stats.ram_duplicate += counts.zero
            self._pass_normal += counts.normal
            self._pass_duplicate += counts.zero
            self.stats.ram_transferred = self.bytes_out
            return
        batch = Batch()
        self._bounce_used = 0
        for rec in self._page_records(mask):
            if batch.add(self.encoder.encode(rec)):
                yield self._ship(batch)
        for rec in self._flush_zero():
            batch.add(self.encoder.encode(rec))
        if batch.parts:
            yield self._ship(batch)
        self.stats.ram_transferred = self.bytes_out

    def _page_records(self, mask: npt.NDArray[np.bool_]) -> Iterator[Record]:
        """The records for the pages in ``mask``: short runs as RAM_SCATTER lists, long
        runs as RAM_PAGES, zero pages as (coalesced) RAM_ZERO runs.

        A record with page data is copied into the bounce buffer when it is yielded, never
        earlier: the caller may ship (and free the buffer) after any record."""
        ram = self.vm.ram
        starts, lengths = page_runs(np.flatnonzero(mask), self._run_pages)
        short = lengths < SCATTER_BELOW
        if short.any():
            # scattered pages (a hot working set): whole lists per record, gathered by numpy
            scattered = np.flatnonzero(mask & expand(starts[short], lengths[short], mask.size))
            starts, lengths = starts[~short], lengths[~short]
            yield from self._scatter(scattered)
        for first, count in zip(starts.tolist(), lengths.tolist(), strict=True):
            zero = ram.zero_mask(first, count)
            for z, s, n in split(zero, first):
                if z:
                    yield from self._zero(s, n)
                else:
                    yield from self._flush_zero()
                    yield self._pages(s, n)  # copied into the bounce buffer only now

    def _ship(self, batch: Batch) -> list[Buffer]:
        """Hand a batch to the host.  The host sends it before asking for more, so the
        bounce buffer its RAM payloads view is free again from here on."""
        self._bounce_used = 0
        self.stats.ram_transferred = self.bytes_out
        return batch.take()

    def _scatter(self, index: npt.NDArray[np.int64]) -> Generator[RamScatter, None, None]:
        """RAM_SCATTER records for scattered pages: zero ones listed, others with data."""
        ram = self.vm.ram
        step = self._run_pages
        for k in range(0, index.size, step):
            chunk = index[k : k + step]
            zero = ram.zero_mask_at(chunk)
            if zero.any():
                self.stats.ram_duplicate += int(zero.sum())
                self._pass_duplicate += int(zero.sum())
                yield RamScatter(ram.page_size, chunk[zero], b"", zero=True)
            live = chunk[~zero]
            if live.size:
                n = live.size * ram.page_size
                snap = self._bounce[self._bounce_used : self._bounce_used + n]
                self._bounce_used += n
                ram.gather(live, snap.reshape(live.size, ram.page_size))
                self.stats.ram_normal += live.size
                self.stats.ram_normal_bytes += n
                self._pass_normal += live.size
                yield RamScatter(ram.page_size, live, snap.data)

    def _pages(self, first: int, count: int) -> RamPages:
        ps = self.vm.ram.page_size
        self.stats.ram_normal += count
        self.stats.ram_normal_bytes += count * ps
        self._pass_normal += count
        n = count * ps
        snap = self._bounce[self._bounce_used : self._bounce_used + n]
        self._bounce_used += n
        np.copyto(snap, self.vm.ram.bytes[first * ps : first * ps + n])
        return RamPages(first * ps, ps, snap.data)

    def _zero(self, first: int, count: int) -> list[Record]:
        self.stats.ram_duplicate += count
        self._pass_duplicate += count
        if self._zero_run is not None and sum(self._zero_run) == first:
            self._zero_run = (self._zero_run[0], self._zero_run[1] + count)
            return []
        out = self._flush_zero()
        self._zero_run = (first, count)
        return out

    def _flush_zero(self) -> list[Record]:
        if self._zero_run is None:
            return []
        first, count = self._zero_run
        self._zero_run = None
        ps = self.vm.ram.page_size
        return [RamZero(first * ps, count, ps)]

    # --- the end ---------------------------------------------------------------------

    def switchover_digests(self) -> dict[str, str]:
        """Digests of RAM and vCPUs as sent (the guest is paused from switchover on).
        Taken once, right after END, while the destination loads."""
        if not self.source_digests:
            t0 = self.clock.monotonic()
            self.source_digests = state_digests(self.vm)
            self.source_digest_ms = (self.clock.monotonic() - t0) * 1e3
        return self.source_digests

    def verification(self, ack: Mapping[str, Any]) -> dict[str, Any]:
        """Compare the destination's digests (sent with LOADED, before COMMIT) with the
        source's.  The caller must not commit unless ``commit_allowed``: a mismatch that
        ``blocking`` lists fails the migration and the source resumes (:meth:`fail`).

        RAM and vCPU digests always block.  A handler's digest blocks too unless the
        pre-flight warned that the destination will change that kind of state (a TCE
        entry it cannot back, a degraded firmware register): the difference is then the
        announced one and is reported (``differ``, ``verified`` false) without blocking.
        Without ``verify`` in the parameters: ``{"requested": False}``."""
        if not self.params.verify:
            return {"requested": False}
        t0 = self.clock.monotonic()
        return digest_report(self.switchover_digests(), ack, bool(self.stats.warnings),
                             lambda: (self.clock.monotonic() - t0) * 1e3)

    def complete(self, ack: Mapping[str, Any]) -> MigrationStats:
        """The destination resumed: close the books.  The source VM stays paused."""
        if self.stats.status is not Status.DEVICE or self._t_end == 0.0:
            raise StreamUsageError(f"complete() in status {self.stats.status.value}")
        now = self.clock.monotonic()
        verify_ms = float(ack.get("verification_ms", 0.0))
        # the guest stays paused while the digests are compared: that is downtime too
        total = (now - self._t_pause) * 1e3
        self.stats.downtime = Downtime(
            total_ms=total,
            final_ram_ms=(self._t_final_ram - self._t_pause) * 1e3,
            state_ms=(self._t_end - self._t_final_ram) * 1e3,
            verification_ms=verify_ms,
            **after_stream(ack, self._t_end, self._t_loaded, now, verify_ms),
        )
        self.meter.stop_device_timed(self.stats.switchover_parts, *self._stop_device,
                                     drain_ms=max(self.stats.downtime.drain_ms, 0.0))
        self.stats.total_time_ms = (now - self._t0) * 1e3
        self.stats.move(Status.COMPLETED)
        self._close_generator()
        for h in self.vm.handlers.values():
            h.save_cleanup()
        return self.stats

    def loaded(self) -> None:
        """The destination's LOADED arrived (the host says when: the downtime's parts)."""
        self._t_loaded = self.clock.monotonic()

    def fail(self, step: str, reason: str, *, cancelled: bool = False) -> MigrationStats:
        """Abandon the migration and give the source VM back, running as before."""
        if self.stats.status is Status.COMPLETED:
            raise StreamUsageError("a completed migration cannot fail")
        self._close_generator()
        self.vm.ram.stop_dirty_log()
        with self.guest.held():
            for h in self.vm.handlers.values():
                try:
                    h.save_failed()
                except Exception as exc:  # the guest must come back whatever a handler does
                    reason += f" (and {h.name} could not recover: {exc})"
        self.guest.set_throttle(0)
        self.stats.throttle_pct = 0
        if self._paused_by_us and self._was_running:
            self.guest.resume()
            self._paused_by_us = False
        if self.stats.status is not Status.FAILED or cancelled:
            self.stats.move(Status.CANCELLED if cancelled else Status.FAILED)
        self.stats.error, self.stats.error_step = reason, step
        self.stats.total_time_ms = (self.clock.monotonic() - self._t0) * 1e3
        return self.stats

    def _close_generator(self) -> None:
        if self._gen is not None:
            self._gen.close()

    def current_step(self) -> str:
        """Where the session is, in words, for failure reports."""
        st = self.stats.status
        if st is Status.ACTIVE and self.ack.awaiting:
            return "awaiting switchover ack"
        if st is Status.ACTIVE:
            return f"ram pass {len(self.stats.passes) + 1}"
        if st is Status.DEVICE:
            return "awaiting destination resume" if self._t_end else "switchover (final pass)"
        if st in (Status.FAILED, Status.CANCELLED) and self.stats.error_step:
            return self.stats.error_step  # where it failed
        return str(st.value)
