"""Issue 11 item 4: the KVM dirty ring as an option (``dirty_log = "ring"``).

The ground truth for "the pages the guest wrote" is guest RAM itself: a copy taken when
logging starts (vCPUs stopped), compared page by page with RAM after the guest ran and
stopped again.  Every mode must report every changed page; it may report at most one page
per vCPU more (a write KVM logged when it made the page writable, whose instruction the
stop interrupted: it retires on the next entry and is logged again then).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from vmferry.errors import ConfigError
from vmferry.host.clocks import MonotonicClock
from vmferry.hw.x86 import kvm
from vmferry.machine import x86
from vmferry.machine.x86 import X86Vm
from vmferry.migration.context import Status
from vmferry.migration.source import MigrationParams, SourceSession

from .helpers import open_fds, wait_progress, x86_vm
from .test_kvm_migration import capabilities, destination, run

pytestmark = pytest.mark.kvm


def _logged_and_changed(vm: X86Vm, seconds: float) -> tuple[set[int], set[int]]:
    vm.pause()
    vm.ram.start_dirty_log()
    before = vm.ram.bytes.copy()
    vm.start()
    time.sleep(seconds)
    vm.pause()
    log = vm.ram.get_dirty_log()
    ps = vm.ram.page_size
    changed = (before.reshape(-1, ps) != vm.ram.bytes.reshape(-1, ps)).any(axis=1)
    return set(np.flatnonzero(log.bitmap).tolist()), set(np.flatnonzero(changed).tolist())


@pytest.mark.parametrize("mode", ["get", "ring"])
def test_item4_ring_and_bitmap_report_exactly_the_pages_the_guest_wrote(mode: str) -> None:
    vm = x86_vm(mib=32, vcpus=2, rate=40, pattern="uniform", dirty_log=mode)
    try:
        vm.start()
        wait_progress(vm, 100)
        logged, changed = _logged_and_changed(vm, 0.3)
        assert len(changed) > 100
        assert changed <= logged, sorted(changed - logged)[:10]  # nothing missed
        assert len(logged - changed) <= 2  # at most one in flight per vCPU
        info = vm.guest_info()
        assert info["dirty_log"] == x86.DIRTY_LOG_MODES[mode]
        if mode == "ring":
            rings = [v.dirty_ring for v in vm.kvm_vcpus]
            assert all(r is not None for r in rings)
            assert sum(r.harvested for r in rings if r is not None) >= len(changed)
            assert info["dirty_ring_full_exits"] == 0
    finally:
        vm.close()


def test_item4_a_full_ring_is_harvested_and_the_guest_goes_on(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ring of 256 entries fills at once: KVM_EXIT_DIRTY_RING_FULL stops the vCPU, its
    thread harvests and re-enters, and no page is lost."""
    monkeypatch.setattr(x86, "DEFAULT_RING_BYTES", 4096)
    vm = x86_vm(mib=32, vcpus=1, rate=60, pattern="uniform", dirty_log="ring")
    try:
        assert vm.kvm_vcpus[0].dirty_ring is not None
        assert vm.kvm_vcpus[0].dirty_ring.n == 256
        vm.start()
        wait_progress(vm, 100)
        logged, changed = _logged_and_changed(vm, 0.5)
        assert len(changed) > 600  # more than two rings' worth: the ring filled
        assert vm.kram.ring_full_exits > 0
        assert changed <= logged and len(logged - changed) <= 1
        assert vm.check_progress() == [True]
    finally:
        vm.close()


def test_item4_ring_needs_the_capability_and_is_refused_cleanly(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    fds = open_fds()
    real = kvm.KvmVm.check_extension

    def without_ring(self: kvm.KvmVm, cap: int) -> int:
        return 0 if cap == kvm.CAP_DIRTY_LOG_RING_ACQ_REL else real(self, cap)

    monkeypatch.setattr(kvm.KvmVm, "check_extension", without_ring)
    with pytest.raises(ConfigError, match="KVM_CAP_DIRTY_LOG_RING_ACQ_REL"):
        x86_vm(dirty_log="ring")
    assert open_fds() == fds


def test_item4_migration_with_the_ring_verifies_and_reports_it() -> None:
    fds = open_fds()
    vm = x86_vm(vcpus=2, rate=30, pattern="hot", mib=32, fill="random", dirty_log="ring")
    vm.start()
    wait_progress(vm, 100)
    definition: dict[str, Any] = vm.definition.to_dict()
    src = SourceSession(vm, MigrationParams(downtime_limit_ms=50, verify=True),
                        MonotonicClock())
    src.preflight(capabilities(definition))
    dst = destination()
    ack = run(src, dst)
    assert src.stats.status is Status.COMPLETED
    assert ack["digests"] == src.switchover_digests()  # RAM and registers equal
    assert vm.kram.reads >= 2 and sum(
        r.harvested for v in vm.kvm_vcpus if (r := v.dirty_ring) is not None) > 0
    assert src.stats.to_json()["ram"]["dirty-tracking"] == x86.DIRTY_LOG_MODES["ring"]
    report = vm.handlers["x86-cpu"].report()
    assert report["dirty_log"] == x86.DIRTY_LOG_MODES["ring"]
    new = dst.vm
    assert isinstance(new, X86Vm) and new.dirty_log_mode == "ring"
    try:
        stopped = sum(c for c, _ in vm.progress())
        dst.resume()
        wait_progress(new, stopped)
        new.pause()
        assert new.check_progress() == [True, True]
    finally:
        new.close()
        vm.close()
    assert open_fds() == fds
