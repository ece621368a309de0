"""The pseries device tree in live migration: Live Partition Mobility's post-migration update.

Theory of operation
-------------------
Every pseries VM carries the device tree its firmware handed it at boot, generated at
creation (:func:`vmferry.hw.spapr.platform.generate_pseries_tree`) from the VM definition
(memory, vCPUs) and the *host's* platform description: the ``[lpm]`` table of the host
platform file (``vmferry host serve --platform FILE``), whose keys are the fields of
:class:`~vmferry.hw.spapr.platform.PlatformParams`::

    [lpm]
    numa_domain = 1            # NUMA associativity domain of the guest's CPUs and memory
    chip = 0
    l2_size = 524288           # cache node geometry (bytes)
    l3_size = 10485760
    cache_line = 128
    shared_interrupt_pool = 0xFFFFFFF2   # platform-facilities properties
    max_sync_cop_len = 4096
    max_sg_len = 4080
    platform_facilities = true
    system_id = "IBM,02VMFERRY"
    timebase_hz = 512000000
    extra_lookup_domains = 0

:class:`PseriesDeviceTreeHandler` (component ``pseries-dt``) holds the guest's live tree,
with the guest's vio bus and cacheinfo holding their node references as a booted guest
does.  In a migration:

0. pre-flight refuses a destination whose pseries VMs carry no tree (its load would fail
   after the source stopped) and warns when the destination has no platform facilities;
1. the source saves the guest tree *and* its own platform description in one component
   record (``VLPM`` envelope around :func:`vmferry.hw.devtree.fdt.encode_state`);
2. the destination restores the guest tree (a bad record fails the load: the source
   resumes), keeping the tree it generated from its own platform as the destination
   firmware's description;
3. before the vCPUs run (``vm_start``; or ``post_load`` for a VM that arrives paused) the
   destination firmware -- :class:`~vmferry.hw.spapr.rtas.RtasFirmware` computed from the
   source platform's tree vs. its own -- serves ``ibm,update-nodes`` and friends to the
   guest's :class:`~vmferry.guest.mobility.MobilityHandler`;
4. ``post_load`` returns the report: nodes and properties changed, hazards, leaks, the
   exposure window, a tree check (reference counts balance, no released node reachable) and
   whether the guest tree now equals the destination's description (outside the
   platform-facilities subtree, which the seed patch keeps as it was at boot).

An update that fails (a malformed work area, a firmware error, a hazard of a faulty mode)
happens after COMMIT: the source can no longer resume, so, as the guest kernel does (it
only logs the failure), the migration completes, the destination VM runs on, and the
report says ``ok: false`` with the errors (the source job's ``destination_ok``).

Definition keys (``device_tree`` table, all optional)::

    device_tree = { mode = "correct", user_space = "held" }

``mode`` is a :data:`vmferry.guest.mobility.MODES` name (``correct``, ``upstream``,
``no_pf_skip``, ``misaligned_add``, ``busy_abort``, ``merge_readd``); ``user_space`` is
``held`` (frozen until the update is applied) or ``immediate`` (running from resume, as
upstream); without it, the mode's own choice applies (``held`` for ``correct``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import xxhash

from vmferry.clock import ManualClock
from vmferry.errors import (
    ConfigError,
    KernelError,
    MigrationRefused,
    VmferryError,
)
from vmferry.guest.drivers import CacheInfo, VioBus
from vmferry.guest.mobility import (
    MODES,
    MobilityHandler,
    MobilityOptions,
    MobilityReport,
    UserSpace,
)
from vmferry.hw.devtree import DeviceTree, dump_fdt
from vmferry.hw.devtree.fdt import DevtreeStateError, restore_tree, save_tree
from vmferry.hw.devtree.fdt import decode_state as decode_tree
from vmferry.hw.devtree.fdt import encode_state as encode_tree
from vmferry.hw.devtree.tree import Canonical, canonical
from vmferry.hw.spapr.platform import LMB_SIZES, PlatformParams, generate_pseries_tree
from vmferry.hw.spapr.rtas import PLATFORM_FACILITIES, RtasFirmware
from vmferry.machine.handlers import BlobHandler, ComponentData, StatePiece
from vmferry.machine.schema import DeviceTreeModel, LpmPlatformModel, check
from vmferry.machine.vm import VM, HostContext

if TYPE_CHECKING:
    from vmferry.machine.pseries import PseriesSetup

MIB: Final = 1 << 20
#: the VM definition key this module adds to the pseries arch
KEYS: Final = frozenset({"device_tree"})
#: the host platform file's table
PLATFORM_TABLE: Final = "lpm"
#: reference holders a consistent tree may carry (structure, vio bus, cacheinfo)
STRUCTURAL: Final = ("creation", "sysfs", "kobj:", "vio:", "cacheinfo")

_STATE = struct.Struct(">4sHI")
_MAGIC = b"VLPM"
_VERSION = 1


# --- configuration -------------------------------------------------------------------------


def platform_params(raw: object, where: str = "host platform [lpm]") -> PlatformParams:
    """Validate a ``[lpm]`` table into :class:`PlatformParams` (the typed
    :data:`~vmferry.machine.schema.LpmPlatformModel`); ConfigError naming the wrong key."""
    return PlatformParams(**check(LpmPlatformModel, raw, where).model_dump())


def host_params(host: HostContext) -> PlatformParams:
    return platform_params(host.platform.get(PLATFORM_TABLE, {}))


@dataclasses.dataclass(frozen=True)
class DeviceTreeOptions:
    mode: str = "correct"
    user_space: str = ""  # "" -> the mode's own

    @classmethod
    def from_definition(cls, raw: object) -> DeviceTreeOptions:
        m = check(DeviceTreeModel, {} if raw is None else raw, "device_tree")
        return cls(m.mode, m.user_space)

    def mobility(self) -> MobilityOptions:
        opts = MODES[self.mode]
        if self.user_space:
            opts = dataclasses.replace(opts, user_space=UserSpace(self.user_space))
        return opts


def lmb_size_for(memory_mib: int) -> int:
    """The largest PAPR LMB size (16..256 MiB) dividing the guest's memory."""
    for size in reversed(LMB_SIZES):
        if (memory_mib * MIB) % size == 0:
            return size
    raise ConfigError(f"pseries memory {memory_mib} MiB is not a multiple of 16 MiB (an LMB)")


# --- the component record ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LpmState:
    """What travels: the guest's tree and the platform description of the host it left."""

    source_host: str
    source_platform: PlatformParams
    tree: bytes  # fdt.encode_state(save_tree(guest tree))


def encode_state(state: LpmState) -> bytes:
    """``"VLPM" | u16 version | u32 json length | json {host, platform} | tree record``."""
    meta = json.dumps({"host": state.source_host,
                       "platform": dataclasses.asdict(state.source_platform)},
                      sort_keys=True).encode()
    return _STATE.pack(_MAGIC, _VERSION, len(meta)) + meta + state.tree


def decode_state(data: bytes) -> LpmState:
    """Strict inverse of :func:`encode_state`; DevtreeStateError on malformed bytes."""
    if len(data) < _STATE.size:
        raise DevtreeStateError("pseries-dt record shorter than its header", len(data))
    magic, version, n = _STATE.unpack_from(data)
    if magic != _MAGIC:
        raise DevtreeStateError(f"pseries-dt record: bad magic {magic!r}", 0)
    if version != _VERSION:
        raise DevtreeStateError(f"pseries-dt record version {version} unsupported", 4)
    if len(data) < _STATE.size + n:
        raise DevtreeStateError(f"pseries-dt record: {n} metadata bytes announced, "
                                f"{len(data) - _STATE.size} present", 6)
    try:
        meta = json.loads(data[_STATE.size:_STATE.size + n])
        if not isinstance(meta, dict) or set(meta) != {"host", "platform"} or not isinstance(
                meta["host"], str):
            raise ValueError("metadata must be {host, platform}")
        params = platform_params(meta["platform"], "pseries-dt record platform")
    except (ValueError, ConfigError) as exc:
        raise DevtreeStateError(f"pseries-dt record metadata: {exc}", _STATE.size) from exc
    tree = bytes(data[_STATE.size + n:])
    decode_tree(tree)  # validates the tree record
    return LpmState(meta["host"], params, tree)


# --- checks --------------------------------------------------------------------------------


def tree_problems(tree: DeviceTree) -> list[str]:
    """Why ``tree`` is not consistent: invariants, non-structural references on reachable
    nodes (a use-after-free waiting to happen), leaks and dangling parents; [] if none."""
    out: list[str] = []
    try:
        tree.check_invariants()
    except VmferryError as exc:
        out.append(f"{type(exc).__name__}: {exc}")
    try:
        for node in tree.walk():
            stray = sorted(h for h in node.holders if not h.startswith(STRUCTURAL))
            if stray:
                out.append(f"{node.path()}: references held by {stray}")
        out += [f"leaked {leak.state} node {leak.node} (refcount {leak.refcount})"
                for leak in tree.leak_report()]
        out += [f"dangling {n.path()} (parent released)" for n in tree.dangling()]
    except VmferryError as exc:  # a walk that meets a released node: reported, not raised
        out.append(f"{type(exc).__name__}: {exc}")
    return out


def tree_differences(got: DeviceTree, want: DeviceTree, *, keep_facilities: bool) -> list[str]:
    """Where ``got`` differs from ``want`` (node paths, ``path:property``).  With
    ``keep_facilities`` the platform-facilities subtree is left out (the seed patch keeps
    the guest's own, by design)."""
    out: list[str] = []
    _diff(canonical(got.root), canonical(want.root), "", out,
          skip=PLATFORM_FACILITIES if keep_facilities else None)
    return out


def _diff(a: Canonical, b: Canonical, path: str, out: list[str], skip: str | None) -> None:
    pa, pb = dict(a[1]), dict(b[1])
    out += [f"{path or '/'}:{name}" for name in sorted(set(pa) | set(pb))
            if pa.get(name) != pb.get(name)]
    ka = {k[0]: k for k in a[2] if isinstance(k, tuple)}
    kb = {k[0]: k for k in b[2] if isinstance(k, tuple)}
    for name in sorted(set(ka) | set(kb)):
        if path == "" and name == skip:
            continue
        child = f"{path}/{name}"
        if name not in ka or name not in kb:
            out.append(child)
        else:
            _diff(ka[name], kb[name], child, out, None)


def facilities(tree: DeviceTree) -> Canonical | None:
    node = tree.find_by_path(f"/{PLATFORM_FACILITIES}")
    return canonical(node) if node is not None else None


# --- the handler ---------------------------------------------------------------------------


class PseriesDeviceTreeHandler(BlobHandler):
    """The guest's device tree: generated at creation, migrated, updated on arrival."""

    name = "pseries-dt"

    def __init__(self, vm: VM, host: HostContext, options: DeviceTreeOptions) -> None:
        self.vm_name = vm.name
        self.memory_mib = vm.definition.memory_mib
        self.vcpus = len(vm.vcpus)
        self.lmb_size = lmb_size_for(self.memory_mib)
        self.host_name = host.name
        self.params = host_params(host)
        self.options = options
        self.mobility = options.mobility()
        #: this host firmware's description of the partition (the destination's, on arrival)
        self.platform_tree = self._generate(self.params)
        self.tree = restore_tree(save_tree(self.platform_tree))  # the guest's live copy
        self._boot_guest()
        self.arrived: LpmState | None = None
        self.update: dict[str, Any] | None = None
        self.stale_run_s = 0.0  # guest time run on this host before the update applied

    def _generate(self, params: PlatformParams) -> DeviceTree:
        return generate_pseries_tree(self.memory_mib, self.vcpus, lmb_size=self.lmb_size,
                                     **dataclasses.asdict(params))

    def _boot_guest(self) -> None:
        """The guest's consumers take their references, as after boot."""
        self.vio = VioBus(self.tree)
        self.cacheinfo = CacheInfo(self.tree)

    def dtb(self) -> bytes:
        return dump_fdt(self.tree)

    # --- both sides --------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        if self.arrived is not None and self.update is None:
            self.stale_run_s += seconds

    def vm_start(self) -> None:
        if self.arrived is not None and self.update is None:
            self._apply("vm_start")

    def report(self) -> dict[str, Any]:
        problems = tree_problems(self.tree)
        out: dict[str, Any] = {
            "host": self.host_name,
            "mode": self.options.mode,
            "user_space": self.mobility.user_space.value,
            "platform": dataclasses.asdict(self.params),
            "nodes": sum(1 for _ in self.tree.walk()),
            "references": self.tree.refcount_total(),
            "check": problems or "ok",
        }
        if self.update is not None:
            out["last_update"] = {k: self.update[k] for k in (
                "ok", "source_host", "nodes_changed", "properties_changed", "hazards",
                "errors", "matches_destination", "exposure_window_s")}
        return out

    def state_digest(self) -> str:
        return xxhash.xxh3_128_hexdigest(self.dtb())

    # --- source ------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        return {"platform": dataclasses.asdict(self.params), "modes": sorted(MODES)}

    def preflight(self, destination: Mapping[str, Any] | None,
                  options: Mapping[str, Any]) -> list[str]:
        """Refuse a destination that cannot take the tree (its load would fail after the
        source stopped); warn when the guest's facilities are missing there."""
        if destination is None or "platform" not in destination:
            raise MigrationRefused(
                f"{self.name}: the destination does not carry pseries device trees")
        try:
            dest = platform_params(destination["platform"], "destination [lpm]")
        except ConfigError as exc:
            raise MigrationRefused(f"{self.name}: {exc}") from exc
        if self.params.platform_facilities and not dest.platform_facilities and self.vio.devices:
            return [f"{self.name}: the destination has no platform facilities; the guest's "
                    f"{sorted(n for n, d in self.vio.devices.items() if d.family == 'pfo')} "
                    "keep their nodes and fail their hypercalls there"]
        return []

    def save_complete(self) -> tuple[StatePiece, ...]:
        state = LpmState(self.host_name, self.params, encode_tree(save_tree(self.tree)))
        return (ComponentData(self.name, encode_state(state)),)

    # --- destination -------------------------------------------------------------------

    def apply(self, data: bytes) -> None:
        """Decode and rebuild the guest's tree; a bad record fails the load."""
        state = decode_state(data)
        tree = restore_tree(decode_tree(state.tree))
        self.tree, self.arrived, self.update, self.stale_run_s = tree, state, None, 0.0
        self._boot_guest()

    def post_load(self) -> dict[str, Any]:
        if self.arrived is None:
            return {}
        if self.update is None:
            self._apply("post_load")
        assert self.update is not None
        return self.update

    # --- the update sequence -----------------------------------------------------------

    def _apply(self, at: str) -> None:
        assert self.arrived is not None
        src = self.arrived
        pf_before = facilities(self.tree)
        clock = ManualClock()
        report = MobilityReport()
        failure = ""
        try:
            firmware = RtasFirmware(self._generate(src.source_platform), self.platform_tree)
            guest = MobilityHandler(self.tree, firmware, clock, self.mobility,
                                    cacheinfo=self.cacheinfo, user_space=self._user_space)
            report = guest.post_mobility_fixup()
        except Exception as exc:  # after COMMIT nothing can be undone: report, never raise
            failure = f"{type(exc).__name__}: {exc}"
        self.update = self._summary(report, src, at, failure, pf_before)

    def _user_space(self) -> None:
        """User space reading ``/sys/bus/vio/devices/*/devspec`` (counted parent walks)."""
        for name in list(self.vio.devices):
            with contextlib.suppress(KernelError):  # a device gone: ENODEV, as a read gets
                self.vio.devspec(name)

    def _summary(self, r: MobilityReport, src: LpmState, at: str, failure: str,
                 pf_before: Canonical | None) -> dict[str, Any]:
        problems = tree_problems(self.tree)
        keep_pf = self.mobility.platfac_filter and not self.mobility.merge_readd
        diffs = tree_differences(self.tree, self.platform_tree, keep_facilities=keep_pf)
        if keep_pf and facilities(self.tree) != pf_before:
            diffs.append(f"/{PLATFORM_FACILITIES} (changed although the seed patch keeps it)")
        errors = [*r.errors, *([failure] if failure else [])]
        changed = [c for c in r.changes if not c.kind.startswith("ignored")]
        ok = r.ok and not failure and not problems and not diffs
        return {
            "ok": ok,
            "applied_at": at,  # vm_start: before the vCPUs ran; post_load: arrived paused
            "guest_ran_before_update_s": self.stale_run_s,
            "source_host": src.source_host,
            "destination_host": self.host_name,
            "mode": self.options.mode,
            "user_space": self.mobility.user_space.value,
            "rc": r.rc,
            "trace": r.trace,
            "changes": [{"kind": c.kind, "path": c.path, "prop": c.prop} for c in r.changes],
            "nodes_changed": sorted({c.path for c in changed if c.kind.endswith("-node")}),
            "properties_changed": sorted({f"{c.path}:{c.prop}" for c in changed if c.prop}),
            "ignored": sorted({c.path for c in r.changes if c.kind.startswith("ignored")}),
            "hazards": [dataclasses.asdict(h) for h in r.hazards],
            "leaks": [dataclasses.asdict(leak) for leak in r.leaks],
            "errors": errors,
            "warnings": r.warnings,
            "exposure_window_s": r.exposure_window_s,
            "user_space_runs": r.user_space_runs,
            "stale_user_runs": r.stale_user_runs,
            "tree_check": problems or "ok",
            "matches_destination": not diffs,
            "differences": diffs,
        }


# --- the pseries setup step ----------------------------------------------------------------


def device_tree_step(s: PseriesSetup) -> None:
    """Generate the VM's tree from its definition and this host's ``[lpm]`` platform."""
    options = DeviceTreeOptions.from_definition(s.definition.get("device_tree"))
    s.vm.add_handler(PseriesDeviceTreeHandler(s.vm, s.host, options))


def device_tree_handler(vm: VM) -> PseriesDeviceTreeHandler:
    handler = vm.handlers.get(PseriesDeviceTreeHandler.name)
    if not isinstance(handler, PseriesDeviceTreeHandler):
        raise ConfigError(f"{vm.name} has no device tree (not a pseries VM)")
    return handler


__all__ = [
    "KEYS",
    "PLATFORM_TABLE",
    "DeviceTreeOptions",
    "LpmState",
    "PseriesDeviceTreeHandler",
    "decode_state",
    "device_tree_handler",
    "device_tree_step",
    "encode_state",
    "host_params",
    "platform_params",
    "tree_differences",
    "tree_problems",
]
