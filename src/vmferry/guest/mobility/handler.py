"""The post-migration sequence as a whole, and the sysfs entry that starts a migration."""

from __future__ import annotations

from collections.abc import Callable

from vmferry.errors import HazardError, InvariantViolation
from vmferry.guest.drivers import CacheInfo
from vmferry.guest.mobility.core import (
    MobilityOptions,
    MobilityReport,
    UserSpace,
    VirtualClock,
    options_of,
)
from vmferry.guest.mobility.update_nodes import UpdateNodesClient
from vmferry.hw.devtree.tree import DeviceTree, HazardRecord, Reconfig, ReconfigEvent
from vmferry.hw.spapr.workarea import MIGRATION_SCOPE
from vmferry.sync import yield_point


class MobilityHandler(UpdateNodesClient):
    """The guest's mobility code bound to one tree, one RTAS and one clock."""

    def post_mobility_fixup(self) -> MobilityReport:
        """Everything after resume; never raises a HazardError (it is reported)."""
        r = self.report
        r.resumed_at = self.clock.monotonic()
        r.user_space_at = r.resumed_at
        self._run_user_space(stale=True)
        observe, self.tree.observe = self.tree.observe, True
        hazards_before = len(self.tree.hazards)
        try:
            self._fixup_steps()
        except HazardError as exc:
            r.hazards.append(HazardRecord(exc.hazard, "", "mobility", str(exc)))
            r.rc = r.rc or -5
        finally:
            r.updated_at = self.clock.monotonic()
            if self.opts.user_space is UserSpace.HELD:
                r.user_space_at = r.updated_at
            self._run_user_space(stale=False)
            r.hazards.extend(self.tree.hazards[hazards_before:])
            self.tree.observe = observe
            r.leaks = self.tree.leak_report()
            self._check_dangling()
        return r

    def _fixup_steps(self) -> None:
        r = self.report
        r.trace.append("activate-firmware")
        self._call(self.rtas.activate_firmware)
        if self.opts.cpus_read_lock:
            self.cpu_hotplug.acquire()
        r.trace.append("cpus_read_lock")
        self.updating = True
        try:
            if self.cacheinfo is not None and self.opts.cacheinfo_teardown:
                r.trace.append("cacheinfo_teardown")
                self.cacheinfo.teardown()
            rc = self.devicetree_update(MIGRATION_SCOPE)
            if rc:
                r.warnings.append(f"device tree update failed: {rc}")
            if self.cacheinfo is not None and self.opts.cacheinfo_teardown:
                r.trace.append("cacheinfo_rebuild")
                self.cacheinfo.rebuild()
        finally:
            self.updating = False
            if self.opts.cpus_read_lock:
                self.cpu_hotplug.release()
            r.trace.append("cpus_read_unlock")
        r.trace.append("mitigations")
        r.trace.append("24x7")

    def cpu_offline(self, cpu: int) -> None:
        """A CPU hot-unplug request: takes the hotplug lock for writing."""
        with self.cpu_hotplug:
            yield_point(f"cpu {cpu} offline", "cpus", write=True)
            if self.updating:
                raise InvariantViolation(
                    f"cpu {cpu} went offline while the device-tree update was running")

    def _check_dangling(self) -> None:
        for node in self.tree.dangling():
            assert node.parent is not None
            self.report.hazards.append(HazardRecord(
                "dangling-parent", node.path(), ",".join(sorted(node.holders)),
                f"{node.path()!r} is still held but its parent was released"))


def changed_paths(events: list[ReconfigEvent]) -> list[str]:
    """Human-readable change list from reconfig notifications."""
    out: list[str] = []
    for e in events:
        if e.action in (Reconfig.ATTACH_NODE, Reconfig.DETACH_NODE):
            out.append(f"{e.action.value} {e.path}")
        else:
            p = e.prop or e.old
            name = p.name if p is not None else "?"
            out.append(f"{e.action.value} {e.path}:{name}")
    return out


def run_post_migration_updates(guest_tree: DeviceTree, source_platform: DeviceTree,
                               dest_platform: DeviceTree,
                               options: MobilityOptions | str = "correct",
                               clock: VirtualClock | None = None,
                               *, firmware_kwargs: dict[str, object] | None = None,
                               ) -> MobilityReport:
    """Run the destination's update sequence against a resumed guest's tree.

    ``guest_tree`` is mutated in place (it is the guest's live tree); the guest's vio bus
    and cacheinfo are bound to it as a booted guest would have them.  Hazards of faulty
    modes are reported, never raised.
    """
    from vmferry.clock import ManualClock
    from vmferry.guest.drivers import VioBus
    from vmferry.hw.spapr.rtas import RtasFirmware

    opts = options_of(options) if isinstance(options, str) else options
    fw = RtasFirmware(source_platform, dest_platform, **(firmware_kwargs or {}))  # type: ignore[arg-type]
    if not any(h.startswith("vio:") for n in guest_tree.walk() for h in n.holders):
        VioBus(guest_tree)  # a booted guest's vio devices hold their node references
    handler = MobilityHandler(guest_tree, fw, clock or ManualClock(), opts,
                              cacheinfo=CacheInfo(guest_tree))
    return handler.post_mobility_fixup()


class MobilitySysfs:
    """``/sys/kernel/mobility``: ``migration`` (write a stream id) and ``api_version``.

    ``migrate`` is the in-kernel migration routine (``pseries_migrate_partition``); it
    returns 0 or a negative errno.  The write returns the byte count or the negative errno.
    """

    api_version = "1"  # kernel performs firmware activation and the DT update

    def __init__(self, migrate: Callable[[int], int]) -> None:
        self.migrate = migrate

    def write_migration(self, text: str) -> int:
        try:
            handle = int(text.strip(), 0)  # base auto-detect, like kstrtou64(buf, 0)
        except ValueError:
            return -22
        if not 0 <= handle < 1 << 64:
            return -34  # -ERANGE
        rc = self.migrate(handle)
        return rc if rc else len(text)
