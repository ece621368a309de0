"""The destination side of a live migration, sans-IO.

:class:`DestinationSession` takes decoded records (from a
:class:`~vmferry.migration.stream.StreamDecoder`) and builds a *staging* VM from them.
Order is enforced: the VM configuration comes first, END last, and every vCPU must have
arrived before END.  Anything out of place is a :class:`~vmferry.errors.MalformedRecord`.
Nothing reaches a running guest before :meth:`finish`: on any error the host calls
:meth:`abort` and the staging VM, with all its memory, is discarded.

``finish`` restores vCPUs, lets every handler complete its load (devices validate their
state, firmware registers are set), optionally takes verification digests and returns
the acknowledgement; ``resume`` then starts the guest and runs the handlers' post-load
work (for example the pseries device-tree update sequence) before the guest counts as
resumed.

The session is in one :class:`Phase` at a time, and :data:`PHASE_MOVES` is the one
table of its moves::

    receiving -END-> ended -finish-> loaded -resume-> resumed -hand_over-> handed-over
    (finish(start=True) goes on to resumed; hand_over also follows loaded)
    any phase before resumed -abort-> aborted
    any exception in receive/finish/resume -> failed (then only abort)

A call in the wrong phase is a :class:`~vmferry.errors.StreamUsageError` naming it (a
record after END stays a ``MalformedRecord``: the stream is wrong, not the caller).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from vmferry.clock import Clock
from vmferry.errors import (
    ConfigError,
    GuestMemoryError,
    MalformedRecord,
    StreamUsageError,
    VmferryError,
)
from vmferry.machine.handlers import (
    ArchState,
    ComponentData,
    DeviceData,
    DevicePhase,
    StatePiece,
)
from vmferry.machine.vcpu import VcpuState
from vmferry.machine.vm import VM, create_vm, load_definition
from vmferry.migration.context import state_digests
from vmferry.migration.stream import (
    ComponentRecord,
    DeviceChunk,
    End,
    KvmClockRecord,
    PassEnd,
    RamPages,
    RamScatter,
    RamZero,
    Record,
    VcpuRecord,
    VmConfig,
    X86VcpuRecord,
)

#: Called with the incoming configuration before anything is built; raise to refuse.
ConfigCheck = Callable[[Mapping[str, Any]], None]


class Phase(enum.Enum):
    RECEIVING = "receiving"
    ENDED = "ended"
    LOADED = "loaded"
    RESUMED = "resumed"
    HANDED_OVER = "handed-over"
    ABORTED = "aborted"
    FAILED = "failed"


P = Phase
#: the session's moves: phase -> the phases it may go to
PHASE_MOVES: dict[Phase, frozenset[Phase]] = {
    P.RECEIVING: frozenset({P.ENDED, P.ABORTED, P.FAILED}),
    P.ENDED: frozenset({P.LOADED, P.ABORTED, P.FAILED}),
    P.LOADED: frozenset({P.RESUMED, P.HANDED_OVER, P.ABORTED, P.FAILED}),
    P.RESUMED: frozenset({P.HANDED_OVER}),
    P.HANDED_OVER: frozenset(),
    P.ABORTED: frozenset(),
    P.FAILED: frozenset({P.ABORTED}),
}


class DestinationSession:
    def __init__(
        self,
        clock: Clock,
        *,
        verify: bool = False,
        check_config: ConfigCheck | None = None,
        factory: Callable[[Mapping[str, Any]], VM] = create_vm,
        switchover_ack: bool = False,
    ) -> None:
        self.clock = clock
        self.verify = verify
        self.check_config = check_config
        self.factory = factory
        self.vm: VM | None = None
        self.vcpus: dict[int, VcpuState] = {}
        self.pages_received = 0
        self.zero_pages_received = 0
        self.passes = 0
        #: the one writer is :meth:`_move`
        self.phase = Phase.RECEIVING
        self._t_end = 0.0
        #: switchover-ack (the source speaks it): INIT_SENT markers still to load, and
        #: whether the acknowledgement is due (None: taken, or never needed)
        self.switchover_ack = switchover_ack
        self._markers_due = 0
        self._ack_due = False
        #: pre-copy device data loaded before the acknowledgement, and the time it took
        self.precopy_device_bytes = 0
        self.precopy_device_s = 0.0
        #: per device, the last pre-copy chunk's load: (seconds, bytes).  The final load
        #: is a chunk of the same kind (the last save's image: mlx5's final delta after
        #: its pre-copy deltas), which a per-byte rate misses when loading an image costs
        #: more than its bytes (a check of the whole device image, say)
        self.last_device_loads: dict[str, tuple[float, int]] = {}

    @property
    def ended(self) -> bool:
        """END arrived (and nothing failed since)."""
        return self.phase in (P.ENDED, P.LOADED, P.RESUMED, P.HANDED_OVER)

    @property
    def resumed(self) -> bool:
        """The guest is (or was handed over as) running here: nothing may discard it."""
        return self.phase in (P.RESUMED, P.HANDED_OVER)

    def _move(self, to: Phase) -> None:
        if to is not self.phase and to not in PHASE_MOVES[self.phase]:
            raise StreamUsageError(f"destination session: {self.phase.value} -> {to.value} "
                                   "is not a legal move")  # fmt: skip
        self.phase = to

    def _expect(self, call: str, *phases: Phase) -> None:
        if self.phase not in phases:
            raise StreamUsageError(f"{call} in phase {self.phase.value} (needs "
                                   f"{' or '.join(p.value for p in phases)})")  # fmt: skip

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """Any exception moves the session to FAILED (only abort() is left then)."""
        try:
            yield
        except BaseException:
            if self.phase not in (P.RESUMED, P.HANDED_OVER, P.ABORTED):
                self.phase = P.FAILED
            raise

    # --- records ---------------------------------------------------------------------

    def receive(self, rec: Record) -> None:
        """Apply one record to the staging VM.  Raises on anything out of place."""
        if self.phase is not P.RECEIVING and self.ended:
            raise MalformedRecord(f"{type(rec).__name__} after END")
        self._expect("receive()", P.RECEIVING)
        with self._failing():
            self._receive(rec)

    def _receive(self, rec: Record) -> None:
        if isinstance(rec, VmConfig):
            self._config(rec)
            return
        vm = self._need_vm(rec)
        if isinstance(rec, RamPages):
            self._pages(vm, rec)
        elif isinstance(rec, RamZero):
            self._zero(vm, rec)
        elif isinstance(rec, RamScatter):
            self._scatter(vm, rec)
        elif isinstance(rec, VcpuRecord):
            self._vcpu(vm, rec)
        elif isinstance(rec, ComponentRecord):
            piece: StatePiece = ComponentData(rec.name, rec.data)
            vm.handler_for(piece).load(piece)
        elif isinstance(rec, DeviceChunk):
            self._device(vm, rec)
        elif isinstance(rec, X86VcpuRecord | KvmClockRecord):
            kind = "x86_vcpu" if isinstance(rec, X86VcpuRecord) else "kvm_clock"
            piece = ArchState(kind, rec.data)
            vm.handler_for(piece).load(piece)
        elif isinstance(rec, PassEnd):
            self.passes = rec.number
        elif isinstance(rec, End):
            self._end(vm)

    def _config(self, rec: VmConfig) -> None:
        if self.vm is not None:
            raise MalformedRecord("a second VM configuration record")
        try:
            definition = load_definition(rec.config)
            if self.check_config is not None:
                self.check_config(rec.config)
            # every page arrives in the stream: the staging VM is built unfilled
            self.vm = self.factory(definition.to_dict() | dict(rec.config) | {"fill": "zero"})
            self.vm.definition = dataclasses.replace(self.vm.definition, fill=definition.fill)
        except ConfigError as exc:
            raise MalformedRecord(f"VM configuration refused: {exc}") from exc
        for h in self.vm.handlers.values():
            h.load_setup()
        if self.switchover_ack:
            self._markers_due = sum(h.load_switchover_ack() for h in self.vm.handlers.values())

    def _device(self, vm: VM, rec: DeviceChunk) -> None:
        """A device chunk into its device now; pre-copy loads are timed (the destination's
        device-load rate) and INIT_SENT markers counted for switchover-ack."""
        piece = DeviceData(rec.device, rec.phase, rec.seq, rec.data)
        t0 = self.clock.monotonic()
        vm.handler_for(piece).load(piece)
        if rec.phase is DevicePhase.PRE_COPY:
            seconds = self.clock.monotonic() - t0
            self.precopy_device_bytes += len(rec.data)
            self.precopy_device_s += seconds
            self.last_device_loads[rec.device] = (seconds, len(rec.data))
        elif rec.phase is DevicePhase.INIT_SENT:
            if not self._markers_due:
                raise MalformedRecord(f"{rec.device}: INIT_SENT marker without switchover-ack")
            self._markers_due -= 1
            self._ack_due = not self._markers_due

    def load_channel_device(self, piece: DeviceData) -> None:
        """A stop-copy device chunk that came over a data channel, in order (the host's
        channel threads reassemble them; they call this one chunk at a time).  Only
        stop-copy data travels there; the main stream then carries no chunk of it."""
        if self.phase not in (P.RECEIVING, P.ENDED):
            raise StreamUsageError(f"a device chunk in phase {self.phase.value}")
        if piece.phase not in (DevicePhase.STOP_COPY, DevicePhase.DONE):
            raise MalformedRecord(f"{piece.device}: a {piece.phase.name} chunk on a data "
                                  "channel")  # fmt: skip
        vm = self.vm
        if vm is None:
            raise MalformedRecord("device state before the VM configuration")
        vm.handler_for(piece).load(piece)

    def device_load_report(self) -> dict[str, list[float]]:
        """The last pre-copy chunk loaded per device, ``{device: [ms, bytes]}``, for the
        source's prediction (the host publishes it in its job)."""
        return {d: [round(s * 1e3, 3), n] for d, (s, n) in self.last_device_loads.items()}

    def take_switchover_ack(self) -> dict[str, Any] | None:
        """The SWITCHOVER_ACK body once every device's initial data is loaded (once;
        None before and after)."""
        if not self._ack_due:
            return None
        self._ack_due = False
        return {"device_bytes": self.precopy_device_bytes,
                "load_ms": self.precopy_device_s * 1e3}  # fmt: skip

    def _need_vm(self, rec: Record) -> VM:
        if self.vm is None:
            raise MalformedRecord(f"{type(rec).__name__} before the VM configuration")
        return self.vm

    def _pages(self, vm: VM, rec: RamPages) -> None:
        ps = _page_size(vm, rec.page_size)
        data = np.frombuffer(rec.data, dtype=np.uint8).reshape(-1, ps)
        try:
            vm.ram.write_pages(rec.gpa // ps, data)
        except GuestMemoryError as exc:
            raise MalformedRecord(f"RAM_PAGES at {rec.gpa:#x}: {exc}") from exc
        self.pages_received += rec.npages

    def _zero(self, vm: VM, rec: RamZero) -> None:
        ps = _page_size(vm, rec.page_size)
        try:
            vm.ram.zero_pages(rec.gpa // ps, rec.npages)
        except GuestMemoryError as exc:
            raise MalformedRecord(f"RAM_ZERO at {rec.gpa:#x}: {exc}") from exc
        self.zero_pages_received += rec.npages

    def _scatter(self, vm: VM, rec: RamScatter) -> None:
        ps = _page_size(vm, rec.page_size)
        if int(rec.pages[0]) < 0 or int(rec.pages[-1]) >= vm.ram.npages:
            raise MalformedRecord(f"RAM_SCATTER page {int(rec.pages[-1])} outside guest RAM")
        if rec.zero:
            vm.ram.zero_pages_at(rec.pages)
            self.zero_pages_received += rec.pages.size
        else:
            data = np.frombuffer(rec.data, dtype=np.uint8).reshape(-1, ps)
            vm.ram.scatter_pages(rec.pages, data)
            self.pages_received += rec.pages.size

    def _vcpu(self, vm: VM, rec: VcpuRecord) -> None:
        if not 0 <= rec.index < len(vm.vcpus):
            raise MalformedRecord(f"vCPU {rec.index} but the VM has {len(vm.vcpus)}")
        if rec.index in self.vcpus:
            raise MalformedRecord(f"vCPU {rec.index} sent twice")
        self.vcpus[rec.index] = VcpuState(rec.index, rec.regs)

    def _end(self, vm: VM) -> None:
        missing = sorted(set(range(len(vm.vcpus))) - set(self.vcpus))
        if missing:
            raise MalformedRecord(f"END before the state of vCPUs {missing}")
        self._move(P.ENDED)
        self._t_end = self.clock.monotonic()

    # --- the end ---------------------------------------------------------------------

    def finish(self, *, start: bool = True) -> dict[str, Any]:
        """Load vCPU and component state, verify on request, resume; the acknowledgement."""
        if self.phase is P.RECEIVING:
            raise StreamUsageError("finish() before END")
        self._expect("finish()", P.ENDED)
        with self._failing():
            return self._finish(start)

    def _finish(self, start: bool) -> dict[str, Any]:
        vm = self.vm
        assert vm is not None
        vm.restore_vcpus(list(self.vcpus.values()))
        for h in vm.handlers.values():
            h.load_complete()
        t_loaded = self.clock.monotonic()
        ack: dict[str, Any] = {"load_ms": (t_loaded - self._t_end) * 1e3}
        if self.verify:
            ack["digests"] = state_digests(vm)
        t_verified = self.clock.monotonic()
        ack["verification_ms"] = (t_verified - t_loaded) * 1e3
        ack["pages"] = self.pages_received
        ack["zero_pages"] = self.zero_pages_received
        self._move(P.LOADED)
        if start:
            ack["post_load"] = self.resume()
        return ack

    def resume(self, *, run: bool = True) -> dict[str, Any]:
        """Start the loaded guest (unless ``run`` is false: it arrives paused) and run
        the handlers' post-load work; returns their reports."""
        self._expect("resume()", P.LOADED)
        vm = self.vm
        assert vm is not None
        with self._failing():
            if run:
                vm.start()
            self._move(P.RESUMED)
            return {name: r for name, h in vm.handlers.items() if (r := h.post_load())}

    def hand_over(self) -> VM:
        """The caller takes ownership of the loaded VM (after the commit point)."""
        self._expect("hand_over()", P.LOADED, P.RESUMED)
        assert self.vm is not None
        self._move(P.HANDED_OVER)
        return self.vm

    def abort(self) -> None:
        """Discard the staging VM and everything received (not once it resumed: it is
        the guest then)."""
        if self.resumed:
            return
        self._move(P.ABORTED)
        if self.vm is not None:
            for h in self.vm.handlers.values():
                with contextlib.suppress(Exception):  # discarding must not fail
                    h.load_failed()
            self.vm.close()
        self.vm = None


def _page_size(vm: VM, claimed: int) -> int:
    """The VM's page size, which a RAM record must carry."""
    if claimed != vm.ram.page_size:
        raise MalformedRecord(f"page size {claimed} but the VM uses {vm.ram.page_size}")
    return claimed


def describe_failure(exc: BaseException) -> str:
    """One line for an operator."""
    if isinstance(exc, VmferryError):
        return f"{type(exc).__name__}: {exc}"
    return f"internal error: {type(exc).__name__}: {exc}"
