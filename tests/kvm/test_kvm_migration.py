"""Issue 11 items 4-6: live migration of real KVM guests, in one process (two KVM VMs)."""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

import pytest

from vmferry.errors import MigrationRefused
from vmferry.host.clocks import MonotonicClock
from vmferry.hw.x86 import kvm
from vmferry.machine.vm import create_vm
from vmferry.machine.x86 import X86Vm
from vmferry.migration.context import Status
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import KvmClockRecord, StreamDecoder, X86VcpuRecord
from vmferry.migration.stream.inspect import summarize

from .helpers import host, open_fds, wait_progress, x86_vm

pytestmark = pytest.mark.kvm


def destination(platform: Mapping[str, Any] | None = None) -> DestinationSession:
    return DestinationSession(MonotonicClock(), verify=True,
                              factory=lambda d: create_vm(d, host(dict(platform or {}))))


def capabilities(vm_def: Mapping[str, Any], platform: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    scratch = create_vm(vm_def, host(dict(platform or {})))
    try:
        return scratch.capabilities()
    finally:
        scratch.close()


def run(src: SourceSession, dst: DestinationSession, tee: io.BytesIO | None = None,
        cut_after: int | None = None) -> dict[str, Any]:
    dec = StreamDecoder()
    bufs = src.start()
    sent = 0
    while bufs:
        for b in bufs:
            dec.feed(b)
            if tee is not None:
                tee.write(b)
        sent += 1
        if cut_after is not None and sent >= cut_after:
            raise ConnectionResetError("channel cut")
        for rec in dec.events():
            dst.receive(rec)
        bufs = src.next_buffers()
    src.switchover_digests()
    ack = dst.finish(start=False)
    src.complete(ack)
    return ack


@pytest.mark.parametrize(("vcpus", "mode"), [(1, "get"), (2, "manual-protect")])
def test_item4_guest_continues_on_destination(vcpus: int, mode: str) -> None:
    fds = open_fds()
    vm = x86_vm(vcpus=vcpus, rate=30, pattern="hot", mib=32, fill="random", dirty_log=mode)
    vm.start()
    wait_progress(vm, 100)
    caps = capabilities(vm.definition.to_dict())
    src = SourceSession(vm, MigrationParams(downtime_limit_ms=50, verify=True),
                        MonotonicClock())
    warnings = src.preflight(caps)
    # this KVM refuses MSR_KVM_POLL_CONTROL even on the same host: dropped, and said so
    if kvm.MSR_KVM_POLL_CONTROL in vm.host_kvm.msrs:
        assert any("MSR_KVM_POLL_CONTROL" in w for w in warnings)
        assert "dropped" in vm.handlers["x86-cpu"].report()
    dst = destination()
    tee = io.BytesIO()
    ack = run(src, dst, tee)
    assert src.stats.status is Status.COMPLETED
    assert ack["digests"] == src.switchover_digests()  # RAM and registers equal
    stopped_at = [c for c, _ in vm.progress()]
    new = dst.vm
    assert isinstance(new, X86Vm)
    try:
        assert [c for c, _ in new.progress()] == stopped_at
        assert new.check_progress() == [True] * vcpus
        dst.resume()
        wait_progress(new, sum(stopped_at))  # the guest runs on where it stopped
        new.pause()
        assert new.check_progress() == [True] * vcpus
        assert vm.kram.reads >= 2  # every pass read KVM's dirty log
    finally:
        new.close()
        vm.close()
    assert open_fds() == fds
    summary = summarize([tee.getvalue()]).to_json()
    assert len(summary["x86_vcpus"]) == vcpus and summary["kvm_clock_ns"] > 0
    assert summary["records"]["X86VcpuRecord"] == vcpus


def test_item4_records_round_trip_and_reject_garbage() -> None:
    vm = x86_vm()
    try:
        st = vm.save_state(0)
        rec = X86VcpuRecord.parse(st.encode())
        assert rec.state == st
        assert len(st.msrs) == len(vm.host_kvm.msrs)
        clock = KvmClockRecord.parse(vm.get_clock().encode())
        assert clock.state.clock_ns > 0
    finally:
        vm.close()
    from vmferry.errors import MalformedRecord, UnsupportedVersion

    bad = bytearray(st.encode())
    struct.pack_into(">H", bad, 4, 3)  # a newer version
    with pytest.raises(UnsupportedVersion, match="version"):
        X86VcpuRecord.parse(bytes(bad))
    with pytest.raises(MalformedRecord):
        X86VcpuRecord.parse(st.encode()[:-3])


@pytest.mark.parametrize(
    ("platform", "named"),
    [({"kvm": {"hide_msrs": [0xC0000082]}}, "MSR 0xc0000082 (LSTAR)"),
     ({"kvm": {"refuse_msrs": [0x277]}}, "MSR 0x277 (IA32_PAT)"),
     ({"kvm": {"hide_cpuid": ["0x80000001:edx:20"]}}, "(nx)")],
)
def test_item5_preflight_refuses_before_any_downtime(platform: dict[str, Any],
                                                     named: str) -> None:
    vm = x86_vm(rate=20)
    vm.start()
    try:
        caps = capabilities(vm.definition.to_dict(), platform)
        src = SourceSession(vm, MigrationParams(), MonotonicClock())
        with pytest.raises(MigrationRefused, match=named.replace("(", r"\(").replace(")", r"\)")):
            src.preflight(caps)
        assert vm.running
        before = sum(c for c, _ in vm.progress())
        wait_progress(vm, before)
    finally:
        vm.close()


def test_item5_without_preflight_the_destination_fails_at_load_and_source_resumes() -> None:
    vm = x86_vm(rate=20)
    vm.start()
    try:
        src = SourceSession(vm, MigrationParams(compat="qemu"), MonotonicClock())
        src.preflight(None)
        dst = destination({"kvm": {"refuse_msrs": [0x277]}})
        with pytest.raises(kvm.KvmError, match="IA32_PAT"):
            run(src, dst)
        dst.abort()
        src.fail("destination load", "refused")
        assert vm.running
        wait_progress(vm, sum(c for c, _ in vm.progress()))
    finally:
        vm.close()


@pytest.mark.parametrize("cut_after", [1, 2, 4])
def test_item6_channel_cut_leaves_source_running_and_no_fd_leak(cut_after: int) -> None:
    fds = open_fds()
    vm = x86_vm(rate=20, mib=16, fill="random")
    vm.start()
    try:
        src = SourceSession(vm, MigrationParams(), MonotonicClock())
        src.preflight(capabilities(vm.definition.to_dict()))
        dst = destination()
        with pytest.raises(ConnectionResetError):
            run(src, dst, cut_after=cut_after)
        dst.abort()
        src.fail("ram pass", "channel cut")
        assert vm.running and dst.vm is None
        before = sum(c for c, _ in vm.progress())
        wait_progress(vm, before)
        vm.pause()
        assert vm.check_progress() == [True]
    finally:
        vm.close()
    assert open_fds() == fds


def test_item4_snapshot_save_and_restore() -> None:
    vm = x86_vm(rate=20)
    vm.start()
    wait_progress(vm, 50)
    src = SourceSession(vm, MigrationParams(offline=True, verify=True), MonotonicClock())
    dst = destination()
    tee = io.BytesIO()
    run(src, dst, tee)
    new = dst.vm
    assert isinstance(new, X86Vm)
    try:
        assert new.progress() == vm.progress()
        dst.resume()
        wait_progress(new, sum(c for c, _ in vm.progress()))
    finally:
        new.close()
        vm.close()


def test_issue14_5_a_destination_of_the_earlier_release_gets_version_1_state() -> None:
    """Its pre-flight answer has no ``state_version``: the vCPU and clock state go in the
    payload layout that release reads, and the guest continues."""
    vm = x86_vm(vcpus=1, rate=20, mib=16)
    vm.start()
    wait_progress(vm, 10)
    caps = capabilities(vm.definition.to_dict())
    assert caps["x86-cpu"].pop("state_version") == 2
    src = SourceSession(vm, MigrationParams(downtime_limit_ms=50, verify=True),
                        MonotonicClock())
    src.preflight(caps)
    dst = destination()
    tee = io.BytesIO()
    run(src, dst, tee)
    assert src.stats.status is Status.COMPLETED
    dec = StreamDecoder()
    dec.feed(tee.getvalue())
    states = [r.data[:2] for r in dec.events() if isinstance(r, X86VcpuRecord | KvmClockRecord)]
    assert states == [b"\0\1", b"\0\1"]  # version 1, as that release wrote it
    new = dst.vm
    assert isinstance(new, X86Vm)
    try:
        assert new.check_progress() == [True]
    finally:
        new.close()
        vm.close()
