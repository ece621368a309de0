"""Issue 11 items 1-3: a real x86-64 guest on KVM, its progress and its dirty log."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vmferry.errors import ConfigError
from vmferry.guest.x86 import program as prog
from vmferry.machine.vm import create_vm

from .helpers import host, open_fds, wait_progress, x86_vm

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("vcpus", [1, 2])
def test_item1_guest_runs_and_checksum_matches_host_recomputation(vcpus: int) -> None:
    fds = open_fds()
    vm = x86_vm(vcpus=vcpus, rate=20)
    try:
        assert vm.backend == "kvm" and len(vm.kvm_vcpus) == vcpus
        vm.start()
        wait_progress(vm, 200 * vcpus)
        vm.pause()
        per_vcpu = vm.progress()
        assert all(c > 0 for c, _ in per_vcpu)  # every vCPU's own thread ran
        assert vm.check_progress() == [True] * vcpus
        # the generator register is x_n of the counter register (x_(n+1) if the vCPU
        # stopped inside a step, after computing the next value)
        for i in range(vcpus):
            regs = dict(vm.save_vcpus()[i].regs)
            n = regs[13]  # r13
            assert regs[11] in (prog.expected(vm.definition.seed, i, n)[0],
                                prog.expected(vm.definition.seed, i, n + 1)[0])
        # the check can fail: a wrong checksum in guest memory is caught
        saved = vm.ram.read(prog.STATUS + 8, 8)
        vm.ram.write(prog.STATUS + 8, (int.from_bytes(saved, "little") ^ 1).to_bytes(8, "little"))
        assert vm.check_progress()[0] is False
        vm.ram.write(prog.STATUS + 8, saved)
        before = sum(c for c, _ in vm.progress())
        time.sleep(0.05)
        assert sum(c for c, _ in vm.progress()) == before  # paused means stopped
        vm.start()
        wait_progress(vm, before)
    finally:
        vm.close()
    assert open_fds() == fds


def test_item2_idle_guest_writes_nothing() -> None:
    vm = x86_vm(rate=0)
    try:
        vm.start()
        time.sleep(0.1)
        vm.pause()
        assert vm.progress() == [(0, 0)]
        assert vm.exits[0] > 0  # it rang the idle doorbell
    finally:
        vm.close()


def test_item2_sequential_pattern_writes_region_in_order() -> None:
    vm = x86_vm(rate=20, pattern="sequential", mib=8)
    try:
        vm.ram.start_dirty_log()
        vm.start()
        n = wait_progress(vm, 300)
        vm.pause()
        n = vm.progress()[0][0]
        dirty = vm.ram.get_dirty_log().pages()
        base, pages = prog.region(vm.ram.size, 1, 0)
        written = set(range(base // 4096, base // 4096 + min(n, pages)))
        data_dirty = {int(p) for p in dirty if p >= base // 4096}
        assert data_dirty == written  # KVM's log: exactly the pages the guest wrote
        x, _ = prog.expected(vm.definition.seed, 0, n)
        last = base + ((n - 1) % pages) * 4096 + ((n - 1) % 512) * 8
        assert int.from_bytes(vm.ram.read(last, 8), "little") == x
    finally:
        vm.close()


@pytest.mark.parametrize("mode", ["get", "manual-protect"])
def test_item4_dirty_log_modes_are_exact(mode: str) -> None:
    vm = x86_vm(rate=40, pattern="hot", dirty_log=mode)
    try:
        vm.start()
        wait_progress(vm, 100)
        vm.ram.start_dirty_log()
        first = sum(c for c, _ in vm.progress())
        time.sleep(0.2)
        vm.pause()
        log1 = vm.ram.get_dirty_log()
        assert log1.count > 0 and vm.kram.reads >= 2
        assert sum(c for c, _ in vm.progress()) > first
        # nothing ran since: the next read is empty
        assert vm.ram.get_dirty_log().count == 0
        assert vm.guest_info()["dirty_log"].startswith(
            "KVM_GET" if mode == "get" else "KVM_CAP_MANUAL")
    finally:
        vm.close()


def test_item2_rate_is_paced_by_the_mailbox() -> None:
    vm = x86_vm(rate=8, mib=16)  # 8 MB/s = about 1950 pages a second
    try:
        vm.start()
        wait_progress(vm, 10)
        a = sum(c for c, _ in vm.progress())
        time.sleep(0.5)
        b = sum(c for c, _ in vm.progress())
        vm.workload.set_throttle(99)  # auto-converge reaches the guest through the mailbox
        time.sleep(0.1)
        c = sum(c for c, _ in vm.progress())
        time.sleep(0.5)
        d = sum(c for c, _ in vm.progress())
        vm.pause()
        # paced: nowhere near the thousands of pages a second an unpaced guest writes
        # per 0.5 s, and throttling slows it further (no timing bound, only an order)
        assert 0 < b - a < 20000
        assert d - c < b - a
    finally:
        vm.close()


def test_item3_guest_info_reports_progress_and_rates() -> None:
    vm = x86_vm(rate=10)
    try:
        vm.start()
        wait_progress(vm, 50)
        vm.run_slice(1.0)
        vm.ram.start_dirty_log()
        time.sleep(0.05)
        vm.run_slice(1.0)
        vm.ram.get_dirty_log()
        time.sleep(0.05)
        vm.run_slice(1.0)
        vm.ram.get_dirty_log()
        info = vm.guest_info()
        assert info["progress"] > 0 and info["exits"] > 0
        assert info["dirty_log_reads"] >= 3 and info["dirty_rate_mbps"] > 0
        assert info["exits_per_s"] > 0
    finally:
        vm.close()


def test_item1_bad_definitions_are_refused() -> None:
    with pytest.raises(ConfigError, match="MiB"):
        create_vm({"name": "big", "arch": "x86_64", "memory_mib": 8192}, host())
    with pytest.raises(ConfigError, match="dirty_log"):
        create_vm({"name": "d", "arch": "x86_64", "memory_mib": 8, "dirty_log": "ring0"}, host())
    vm = create_vm({"name": "n", "arch": "x86_64", "memory_mib": 8})  # no vCPU threads
    try:
        with pytest.raises(ConfigError, match="vCPU threads"):
            vm.start()
    finally:
        vm.close()


def test_item1_random_fill_keeps_the_program() -> None:
    vm = x86_vm(rate=10, fill="random")
    try:
        assert not np.all(vm.ram.pages[prog.DATA // 4096 :] == 0)
        vm.start()
        wait_progress(vm, 20)
        vm.pause()
        assert vm.check_progress() == [True]
    finally:
        vm.close()


def test_item9_populate_faults_pages_in_without_changing_them() -> None:
    vm = x86_vm(mib=8, rate=0)
    try:
        before = vm.ram.digest()
        assert vm.kram.populate(0, vm.ram.npages)
        assert vm.ram.digest() == before
        assert not vm.kram.populate(vm.ram.npages, 1)  # outside RAM: refused
    finally:
        vm.close()
