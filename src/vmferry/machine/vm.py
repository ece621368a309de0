"""A VM as a composition: guest RAM, vCPUs, a workload and migratable components.

A VM is built from a *definition* -- a TOML file or a dict with the same schema -- by
:func:`create_vm`.  Keys common to every architecture:

=============  ==========================================================================
``name``       VM name (letters, digits, ``-_.``), required
``arch``       ``generic`` (more architectures register themselves in ``ARCHES``)
``memory_mib`` guest RAM in MiB (default 1024)
``vcpus``      number of vCPUs (default 1)
``workload``   table: ``dirty_rate_mbps``, ``pattern``, ``hot_fraction``, ``hot_weight``,
               ``seed`` (see :mod:`vmferry.guest.workload`)
``fill``       initial RAM contents: ``zero``, ``random`` or ``mixed`` (default ``zero``)
``seed``       seed for ``fill`` (default 1)
``devices``    VFIO devices: a list of device tables (see :mod:`vmferry.machine.vfio`)
=============  ==========================================================================

Everything beyond RAM and core vCPU registers (VFIO devices, firmware registers, TCE
tables, the device tree) plugs in as a :class:`~vmferry.machine.handlers.MigrationHandler`;
the simple one-blob case is a :class:`~vmferry.machine.handlers.Component`.  The engine
calls handlers in registration order.

A VM is built *on a host*: :class:`HostContext` carries what the host is (its name, a
capability profile such as an arm64 kernel era, a platform description), so the same
definition builds the VM the host can really run.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from vmferry.errors import ConfigError, MalformedRecord, ModelError
from vmferry.guest.workload import Workload, WorkloadSpec
from vmferry.hw.memory import GuestMemory
from vmferry.machine.handlers import (
    ArchState,
    Component,
    ComponentData,
    ComponentHandler,
    MigrationHandler,
    StatePiece,
)
from vmferry.machine.ram import PAGE_4K, GuestRam
from vmferry.machine.vcpu import Vcpu, VcpuState, regs_digest

MIB = 1024 * 1024
MAX_VCPUS = 512
FILLS = ("zero", "random", "mixed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_COMMON_KEYS = {"name", "arch", "memory_mib", "vcpus", "workload", "fill", "seed"}


@dataclass(frozen=True)
class HostContext:
    """The host a VM is built on."""

    name: str = "local"
    #: a host capability profile (see :mod:`vmferry.machine.profiles`), or None
    profile: Any = None
    #: the host's platform description (pseries: what its firmware reports), if any
    platform: Mapping[str, Any] = field(default_factory=dict)
    #: the host's IOMMU boot probe (a ``vmferry.hw.iommu.BootResult``), None if it has none:
    #: device assignment takes IOMMU groups from it
    iommu: Any = None
    #: runs a real VM's vCPUs in threads (``vmferry.machine.x86.VcpuThreads``), None on a
    #: host that runs no real guests
    vcpu_threads: Any = None


class HypercallResult(Protocol):
    """What a guest sees after a hypercall: the return code and the output registers."""

    @property
    def ret(self) -> int: ...

    @property
    def out(self) -> tuple[int, ...]: ...


class HypercallHandler(Protocol):
    """An architecture's hypercall entry (pseries: KVM, then the VMM on H_TOO_HARD)."""

    def __call__(self, opcode: int, *args: int, vcpu: int = 0) -> HypercallResult: ...


class NoHypercalls(ModelError):
    """The VM's architecture has no hypercall interface."""


#: Called once the VM exists, to attach handlers for an architecture or a feature.
SetupHook = Callable[["VM", Mapping[str, Any], HostContext], None]


@dataclass(frozen=True)
class ArchSupport:
    """What an architecture contributes to a VM."""

    name: str
    page_size: int = PAGE_4K
    extra_keys: frozenset[str] = frozenset()
    setup: SetupHook | None = None
    #: builds the VM when the architecture needs a VM class of its own (x86_64 on KVM)
    factory: Callable[[VmDefinition, HostContext], VM] | None = None


ARCHES: dict[str, ArchSupport] = {"generic": ArchSupport("generic")}

#: Definition keys any architecture accepts, each with the hook that builds its handlers.
#: Hooks run after the architecture's.  Features register themselves when imported, as
#: architectures do (:mod:`vmferry.machine.vfio` registers ``devices``).
FEATURES: dict[str, SetupHook] = {}


@dataclass(frozen=True)
class VmDefinition:
    name: str
    arch: str = "generic"
    memory_mib: int = 1024
    vcpus: int = 1
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    fill: str = "zero"
    seed: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> VmDefinition:
        if not isinstance(d, Mapping):
            raise ConfigError("a VM definition is a table of keys")
        arch = d.get("arch", "generic")
        if arch not in ARCHES:
            raise ConfigError(f"arch {arch!r} is not one of {sorted(ARCHES)}")
        unknown = set(d) - _COMMON_KEYS - ARCHES[arch].extra_keys - set(FEATURES)
        if unknown:
            raise ConfigError(f"unknown VM definition keys for arch {arch}: {sorted(unknown)}")
        name = d.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"VM name {name!r} must match {_NAME.pattern}")
        memory_mib, vcpus = d.get("memory_mib", 1024), d.get("vcpus", 1)
        if not isinstance(memory_mib, int) or isinstance(memory_mib, bool) or memory_mib <= 0:
            raise ConfigError(f"memory_mib must be a positive integer, not {memory_mib!r}")
        if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= MAX_VCPUS:
            raise ConfigError(f"vcpus must be an integer in [1, {MAX_VCPUS}], not {vcpus!r}")
        fill = d.get("fill", "zero")
        if fill not in FILLS:
            raise ConfigError(f"fill {fill!r} is not one of {FILLS}")
        seed = d.get("seed", 1)
        if not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, not {seed!r}")
        workload = d.get("workload")
        if workload is not None and not isinstance(workload, Mapping):
            raise ConfigError("workload must be a table")
        extra = {k: d[k] for k in ARCHES[arch].extra_keys | set(FEATURES) if k in d}
        return cls(
            name, arch, memory_mib, vcpus, WorkloadSpec.from_definition(workload), fill, seed, extra
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "workload": self.workload.to_definition(),
            "fill": self.fill,
            "seed": self.seed,
            **self.extra,
        }


class VM:
    """A virtual machine.  Created paused; :meth:`start` runs it."""

    def __init__(self, definition: VmDefinition, host: HostContext | None = None) -> None:
        self.definition = definition
        self.host = host if host is not None else HostContext()
        self.name = definition.name
        self.arch = ARCHES[definition.arch]
        self.ram = self._make_ram()
        self.vcpus = [Vcpu(i) for i in range(definition.vcpus)]
        self.workload = self._make_workload()
        self.handlers: dict[str, MigrationHandler] = {}
        self.guest_time = 0.0
        self._hypercalls: HypercallHandler | None = None
        self._device_memory: Callable[[str], GuestMemory] | None = None

    #: what runs the guest: "model" (this process simulates it) or "kvm"
    backend = "model"

    def _make_ram(self) -> GuestRam:
        return GuestRam(self.definition.memory_mib * MIB, self.arch.page_size)

    def _make_workload(self) -> Workload:
        return Workload(self.definition.workload, self.ram)

    def guest_info(self) -> dict[str, Any] | None:
        """What the guest itself reports (a real guest's progress), or None."""
        return None

    # --- composition -----------------------------------------------------------------

    def add_handler(self, handler: MigrationHandler) -> None:
        if handler.name in self.handlers:
            raise ConfigError(f"{self.name}: handler {handler.name!r} added twice")
        clash = [h.name for h in self.handlers.values() if h.device_ids & handler.device_ids]
        if clash:
            raise ConfigError(f"{self.name}: {handler.name} claims devices of {clash}")
        self.handlers[handler.name] = handler

    def add_component(self, component: Component) -> None:
        self.add_handler(ComponentHandler(component))

    def set_hypercalls(self, handler: HypercallHandler) -> None:
        """Install the architecture's hypercall entry (once, from its setup hook)."""
        if self._hypercalls is not None:
            raise ConfigError(f"{self.name}: hypercall handler installed twice")
        self._hypercalls = handler

    def hcall(self, opcode: int, *args: int, vcpu: int = 0) -> HypercallResult:
        """Issue hypercall ``opcode`` with argument registers ``args`` from vCPU ``vcpu``,
        as the guest does; the result carries ``.ret`` and ``.out``.  Raises NoHypercalls
        on an architecture without a hypercall interface, ConfigError for a bad vCPU."""
        if self._hypercalls is None:
            raise NoHypercalls(f"{self.name}: arch {self.arch.name} has no hypercalls")
        if not 0 <= vcpu < len(self.vcpus):
            raise ConfigError(f"{self.name}: no vCPU {vcpu} (the VM has {len(self.vcpus)})")
        return self._hypercalls(opcode, *args, vcpu=vcpu)

    def set_device_memory(self, factory: Callable[[str], GuestMemory]) -> None:
        """Install how devices reach guest memory (an arch with an IOMMU: through its
        tables); set once, by the arch's setup hook."""
        if self._device_memory is not None:
            raise ConfigError(f"{self.name}: device memory installed twice")
        self._device_memory = factory

    def device_memory(self, device: str) -> GuestMemory:
        """What device ``device`` DMAs into: guest RAM itself unless the arch put an IOMMU
        in between."""
        return self.ram if self._device_memory is None else self._device_memory(device)

    def handler_for(self, piece: StatePiece) -> MigrationHandler:
        """The handler a state piece belongs to; MalformedRecord if none."""
        if isinstance(piece, ComponentData):
            h = self.handlers.get(piece.name)
            if h is not None:
                return h
            raise MalformedRecord(f"state for unknown component {piece.name!r}")
        if isinstance(piece, ArchState):
            for h in self.handlers.values():
                if piece.kind in h.arch_kinds:
                    return h
            raise MalformedRecord(f"{piece.kind} state but the VM has no handler for it")
        for h in self.handlers.values():
            if piece.device in h.device_ids:
                return h
        raise MalformedRecord(f"state for unknown device {piece.device!r}")

    def capabilities(self) -> dict[str, Any]:
        """What this VM's host accepts, per handler (the destination side of pre-flight)."""
        return {name: h.capabilities() for name, h in self.handlers.items()}

    def report(self) -> dict[str, Any]:
        return {name: r for name, h in self.handlers.items() if (r := h.report())}

    # --- execution -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return any(v.running for v in self.vcpus)

    def start(self) -> None:
        for h in self.handlers.values():
            h.vm_start()
        for v in self.vcpus:
            v.run()

    def pause(self) -> None:
        for v in self.vcpus:
            v.pause()

    def run_slice(self, seconds: float) -> int:
        """Let ``seconds`` of guest time pass; returns pages the workload dirtied."""
        if not self.running or seconds <= 0:
            return 0
        self.guest_time += seconds
        cycles = int(seconds * 1e9)
        for v in self.vcpus:
            v.advance(cycles)
        for h in self.handlers.values():
            h.advance(seconds)
        return self.workload.run(seconds)

    def vcpu_cpu_seconds(self) -> float:
        """CPU seconds used by vCPU threads of the VM's own (a real guest's); a simulated
        guest runs in the host's runner thread, which the host times itself."""
        return 0.0

    # --- state -----------------------------------------------------------------------

    def save_vcpus(self) -> list[VcpuState]:
        return [v.save() for v in self.vcpus]

    def restore_vcpus(self, states: list[VcpuState]) -> None:
        if sorted(s.index for s in states) != list(range(len(self.vcpus))):
            raise ConfigError(
                f"{self.name}: vCPU states for {sorted(s.index for s in states)} "
                f"do not match {len(self.vcpus)} vCPUs"
            )
        for st in states:
            self.vcpus[st.index].restore(st)

    def vcpu_digest(self) -> str:
        return regs_digest(self.save_vcpus())

    def fill_memory(self, kind: str, seed: int) -> None:
        """Initial RAM contents: ``zero`` (untouched), ``random`` or ``mixed``."""
        if kind not in FILLS:
            raise ConfigError(f"fill {kind!r} is not one of {FILLS}")
        if kind == "zero":
            return
        # One random block, re-keyed per chunk with an xor: every page differs and none
        # compresses, at memory speed rather than generator speed.
        chunk = max(1, (16 * MIB) // self.ram.page_size)
        words = chunk * self.ram.page_size // 8
        base = np.random.default_rng(seed).bit_generator.random_raw(words).astype(np.uint64)
        for first in range(0, self.ram.npages, chunk):
            count = min(chunk, self.ram.npages - first)
            key = np.uint64((first + 1) * 0x9E3779B97F4A7C15 & ((1 << 64) - 1))
            if kind == "random":
                self.ram.fill_words(first, count, _xor_with(base, key))
                continue
            # mixed, in 1 MiB blocks as real guests lay memory out: a quarter random, a
            # quarter sparse (one word a page), half left zero
            pages = np.bitwise_xor(base[: count * self.ram.page_size // 8], key)
            pages8 = pages.view(np.uint8).reshape(count, self.ram.page_size)
            block = max(1, MIB // self.ram.page_size)
            sel = (np.arange(first, first + count) // block) % 4
            pages8[sel == 1, 8:] = 0
            keep = np.flatnonzero(sel < 2)
            self.ram.scatter_pages(keep + first, pages8[keep])

    def close(self) -> None:
        self.pause()
        self.ram.close()


def _xor_with(
    base: npt.NDArray[np.uint64], key: np.uint64
) -> Callable[[npt.NDArray[np.uint64]], object]:
    def produce(out: npt.NDArray[np.uint64]) -> object:
        return np.bitwise_xor(base[: out.size], key, out=out)

    return produce


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a table; ConfigError naming ``what`` it was meant to be."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def load_definition(source: Mapping[str, Any] | str | Path) -> VmDefinition:
    """Parse a definition from a dict or a TOML file path."""
    if isinstance(source, str | Path):
        return VmDefinition.parse(read_toml(Path(source), "VM definition"))
    return VmDefinition.parse(source)


def create_vm(
    definition: Mapping[str, Any] | VmDefinition | str | Path, host: HostContext | None = None
) -> VM:
    """Build a paused VM from a definition (dict, parsed definition or TOML path) on
    ``host`` (default: a host with no profile)."""
    parsed = definition if isinstance(definition, VmDefinition) else load_definition(definition)
    host = host if host is not None else HostContext()
    arch = ARCHES[parsed.arch]
    vm = arch.factory(parsed, host) if arch.factory is not None else VM(parsed, host)
    try:
        if vm.arch.setup is not None:
            vm.arch.setup(vm, parsed.extra, vm.host)
        for key, hook in FEATURES.items():
            if key in parsed.extra:
                hook(vm, parsed.extra, vm.host)
        vm.fill_memory(parsed.fill, parsed.seed)
    except BaseException:
        vm.close()
        raise
    return vm
