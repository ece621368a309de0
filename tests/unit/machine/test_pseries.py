"""The pseries machine: public face (create_vm + vm.hcall), host maps, DMA devices,
pre-copy marking, and migration with the destination's own rebuild (in one process)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from vmferry.clock import ManualClock
from vmferry.errors import ConfigError, MalformedRecord, MigrationRefused
from vmferry.hw.spapr import Hcall, HRet, SpaprIommu
from vmferry.hw.spapr.dmadev import desc_offset
from vmferry.hw.spapr.persist import SpaprTceState, WindowState, encode_state
from vmferry.hw.spapr.tce import TCE_PCI_READ, TCE_PCI_WRITE, TceRestoreError, encode_tce_list
from vmferry.machine import VM, HostContext, create_vm
from vmferry.machine.handlers import ComponentData
from vmferry.machine.pseries import SpaprDmaHandler, tce_handler
from vmferry.machine.ram import PAGE_64K
from vmferry.machine.vm import NoHypercalls
from vmferry.migration.context import state_digests
from vmferry.migration.destination import DestinationSession
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import StreamDecoder

LIOBN = 0x80000000
DDW = 0x80000001
IOMMU_PAGE = 1 << 16


def public_vm(**extra: Any) -> VM:
    return create_vm(
        {
            "name": "ppc",
            "arch": "pseries",
            "memory_mib": 64,
            "vcpus": 2,
            "tce_windows": [{"liobn": LIOBN, "offset": 0, "size_mib": 256, "page_shift": 16}],
            **extra,
        }
    )


def dma_vm(host: HostContext | None = None, **extra: Any) -> VM:
    definition = {
        "name": "ppc-dma",
        "arch": "pseries",
        "memory_mib": 64,
        "vcpus": 2,
        "tce_windows": [{"liobn": LIOBN, "offset": 0, "size_mib": 256, "page_shift": 16}],
        "dma_devices": [{"name": "nic0", "liobn": LIOBN, "buffers": 4, "rate_mbps": 8}],
        "workload": {"dirty_rate_mbps": 20, "seed": 5},
        **extra,
    }
    return create_vm(definition, host)


def iommu(vm: VM) -> SpaprIommu:
    return tce_handler(vm).iommu


def nic(vm: VM, name: str = "nic0") -> SpaprDmaHandler:
    handler = vm.handlers[f"spapr-dma:{name}"]
    assert isinstance(handler, SpaprDmaHandler)
    return handler


def run(vm: VM, slices: int, dt: float = 0.01) -> None:
    for _ in range(slices):
        vm.run_slice(dt)


# --- the public face ---------------------------------------------------------------------


def test_create_vm_and_hcalls_as_the_issue_states() -> None:
    vm = public_vm()
    try:
        assert vm.arch.name == "pseries" and vm.ram.page_size == PAGE_64K
        put = vm.hcall(Hcall.H_PUT_TCE, LIOBN, 5 * IOMMU_PAGE, 0x30000 | TCE_PCI_WRITE)
        assert put.ret == HRet.H_SUCCESS and put.out == ()
        get = vm.hcall(Hcall.H_GET_TCE, LIOBN, 5 * IOMMU_PAGE, vcpu=1)
        assert get.ret == HRet.H_SUCCESS and get.out == (0x30000 | TCE_PCI_WRITE,)
        # H_PUT_TCE_INDIRECT reads its big-endian list from guest memory
        tces = [(0x100000 + i * IOMMU_PAGE) | TCE_PCI_READ for i in range(4)]
        vm.ram.write(0x8000, encode_tce_list(tces))
        ind = vm.hcall(Hcall.H_PUT_TCE_INDIRECT, LIOBN, 16 * IOMMU_PAGE, 0x8000, 4)
        assert ind.ret == HRet.H_SUCCESS
        for i, tce in enumerate(tces):
            assert vm.hcall(Hcall.H_GET_TCE, LIOBN, (16 + i) * IOMMU_PAGE).out == (tce,)
        assert vm.hcall(Hcall.H_STUFF_TCE, LIOBN, 16 * IOMMU_PAGE, 0, 4).ret == HRet.H_SUCCESS
        assert vm.hcall(Hcall.H_GET_TCE, LIOBN, 17 * IOMMU_PAGE).out == (0,)
        # what the guest sees for bad arguments is a return code, never 9999
        assert vm.hcall(Hcall.H_PUT_TCE, 0x1234, 0, 0).ret == HRet.H_PARAMETER
        assert vm.hcall(Hcall.H_PUT_TCE_INDIRECT, LIOBN, 0, 0x8008, 4).ret == HRet.H_PARAMETER
        assert vm.hcall(0x4242).ret == HRet.H_FUNCTION
        iommu(vm).check_invariants()
        report = vm.report()["spapr-tce"]
        assert report["invariants"] == "ok" and report["windows"][0]["mapped"] == 1
    finally:
        vm.close()


def test_hcall_needs_an_arch_with_hypercalls_and_a_real_vcpu() -> None:
    generic = create_vm({"name": "x86ish", "memory_mib": 4})
    vm = public_vm()
    try:
        with pytest.raises(NoHypercalls):
            generic.hcall(Hcall.H_GET_TCE, LIOBN, 0)
        with pytest.raises(ConfigError, match="no vCPU 2"):
            vm.hcall(Hcall.H_GET_TCE, LIOBN, 0, vcpu=2)
        with pytest.raises(ConfigError, match="twice"):
            vm.set_hypercalls(iommu(vm).hcall)
    finally:
        generic.close()
        vm.close()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"tce_windows": [{"liobn": LIOBN, "size_mib": 8, "page_shift": 13}]}, "page_shift"),
        ({"tce_windows": {"liobn": 1}}, "must be a list"),
        ({"dma_devices": [{"name": "nic0", "liobn": 0x42}]}, "no tce window"),
        ({"dma_devices": [{"name": "nic0"}]}, "required"),
        ({"dma_devices": [{"name": "n", "liobn": LIOBN}, {"name": "n", "liobn": LIOBN}]}, "dup"),
        ({"dma_devices": [{"name": "n", "liobn": LIOBN, "buffers": 1000}]}, "quarter of RAM"),
        ({"devices_typo": []}, "unknown VM definition keys"),
    ],
)
def test_bad_pseries_definitions_are_config_errors(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        public_vm(**extra)


@pytest.mark.parametrize(
    ("platform", "match"),
    [
        ({"spapr": {"iommu_page_shift": 13}}, "iommu_page_shift"),
        ({"spapr": {"memslots": [{"size_mib": 32}]}}, "cover 32 MiB"),
        ({"spapr": {"hpa_base": 0x1234}}, "aligned"),
        ({"spapr": {"tce_mode": "nonsense"}}, "unknown TCE mode"),
        ({"spapr": {"colour": 1}}, "unknown spapr platform"),
    ],
)
def test_bad_host_platforms_are_config_errors(platform: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_vm(
            {"name": "p", "arch": "pseries", "memory_mib": 64}, HostContext("h", platform=platform)
        )


def test_two_hosts_translate_the_same_guest_view_differently() -> None:
    a = public_vm()
    b = create_vm(a.definition, HostContext("other-host"))
    try:
        for vm in (a, b):
            assert vm.hcall(Hcall.H_PUT_TCE, LIOBN, 0, 0x20000 | TCE_PCI_WRITE).ret == 0
        hw_a = iommu(a).hw_tables(LIOBN)[0].read(0)
        hw_b = iommu(b).hw_tables(LIOBN)[0].read(0)
        assert hw_a != hw_b
        assert iommu(a).host.hpa_to_gpa(hw_a & ~3) == iommu(b).host.hpa_to_gpa(hw_b & ~3)
    finally:
        a.close()
        b.close()


# --- DMA devices through the hardware tables ------------------------------------------------


def test_dma_device_writes_guest_buffers_through_the_tables() -> None:
    vm = dma_vm()
    try:
        vm.start()
        run(vm, 50)
        rep = vm.report()["spapr-dma:nic0"]
        assert rep["faults"] == 0 and not rep["halted"] and not rep["driver_error"]
        assert rep["dma_count"] > 4 and rep["driver"]["received"] > 4
        assert rep["driver"]["corrupt"] == 0
        tce = vm.report()["spapr-tce"]
        assert tce["invariants"] == "ok" and tce["windows"][0]["mapped"] == 5  # ring + 4
    finally:
        vm.close()


@pytest.mark.parametrize("kind", ["unmapped", "read-only"])
def test_dma_to_an_unmapped_or_read_only_ioba_is_refused(kind: str) -> None:
    vm = dma_vm(workload={"dirty_rate_mbps": 0})  # only the device could change memory
    try:
        vm.start()
        run(vm, 1)  # the driver probes: ring and buffers mapped, device programmed
        vm.pause()
        dev = nic(vm)
        target_gpa = 0x200000
        before = vm.ram.read(target_gpa, PAGE_64K)
        bad_ioba = 200 * IOMMU_PAGE
        if kind == "read-only":
            perm = target_gpa | TCE_PCI_READ
            assert vm.hcall(Hcall.H_PUT_TCE, LIOBN, bad_ioba, perm).ret == HRet.H_SUCCESS
        ring = dev.driver.ring_gpa + desc_offset(dev.device.head)
        vm.ram.write(ring, bad_ioba.to_bytes(8, "big"))  # the guest hands out a bad IOBA
        digest = vm.ram.digest()
        vm.start()
        run(vm, 5)
        assert dev.device.faults == 1 and dev.device.halted
        fault = iommu(vm).dma_faults[-1]
        assert fault.ioba == bad_ioba and fault.write
        assert ("permission" if kind == "read-only" else "unmapped") in str(fault)
        assert vm.ram.read(target_gpa, PAGE_64K) == before
        assert vm.ram.digest() == digest  # not a byte of the refused DMA landed
        assert vm.report()["spapr-tce"]["dma_faults"] == 1
    finally:
        vm.close()


def test_writable_mappings_count_as_dirty_while_devices_run() -> None:
    vm = dma_vm(workload={"dirty_rate_mbps": 0})
    try:
        vm.start()
        run(vm, 1)
        vm.pause()
        handler = tce_handler(vm)
        ro_gpa = 0x300000
        assert vm.hcall(Hcall.H_PUT_TCE, LIOBN, 300 * IOMMU_PAGE, ro_gpa | TCE_PCI_READ).ret == 0
        vm.ram.start_dirty_log()
        handler.quiesce()
        dirty = set(vm.ram.get_dirty_log().pages().tolist())
        writable = {gpa // PAGE_64K for gpa, _ in iommu(vm).dma_writable_ranges()}
        assert writable and writable <= dirty
        assert ro_gpa // PAGE_64K not in dirty
        handler.untracked_liobns.clear()  # devices with their own dirty tracking: no marking
        handler.quiesce()
        assert vm.ram.get_dirty_log().count == 0
    finally:
        vm.close()


# --- migration, in one process ---------------------------------------------------------------


def migrate(
    src: VM, dst_host: HostContext, before_finish: Callable[[VM], None] | None = None
) -> tuple[VM, dict[str, Any], SourceSession]:
    clock = ManualClock()
    source = SourceSession(src, MigrationParams(), clock)
    decoder = StreamDecoder()

    def factory(d: Mapping[str, Any]) -> VM:
        return create_vm(d, dst_host)

    dest = DestinationSession(clock, verify=True, factory=factory)
    # what the destination's pre-flight would hand the source
    scratch = create_vm(src.definition, dst_host)
    warnings = source.preflight(scratch.capabilities())
    scratch.close()

    def push(bufs: list[Any]) -> None:
        for b in bufs:
            decoder.feed(b)
        for rec in decoder.events():
            dest.receive(rec)
        src.run_slice(0.01)  # the guest, its driver and its device run during pre-copy
        clock.advance(0.01)

    push(source.start())
    while bufs := source.next_buffers():
        push(bufs)
    decoder.eof()
    if before_finish is not None:
        assert dest.vm is not None
        before_finish(dest.vm)
    try:
        ack = dest.finish()
    except Exception as exc:
        dest.abort()
        source.fail("destination load", str(exc))
        raise
    source.complete(ack)
    assert dest.vm is not None
    ack["warnings"] = warnings
    return dest.vm, ack, source


def test_migration_rebuilds_tables_and_dma_reaches_the_same_pages() -> None:
    src = dma_vm()
    src.start()
    run(src, 20)
    dst, ack, source = migrate(src, HostContext("dst"))
    try:
        assert len(source.stats.passes) >= 1
        src_digests = state_digests(src)
        assert ack["digests"] == src_digests  # RAM, vCPUs, TCE view + reach, device regs
        rebuild = ack["post_load"]["spapr-tce"]["rebuild"]
        assert rebuild["cleared"] == 0 and rebuild["mapped"] == 5
        assert ack["post_load"]["spapr-tce"]["invariants"] == "ok"
        hw_src, hw_dst = iommu(src).hw_tables(LIOBN)[0], iommu(dst).hw_tables(LIOBN)[0]
        assert not np.array_equal(hw_src.tces, hw_dst.tces)  # other hpas on the other host
        received = nic(dst).report()["dma_count"]
        run(dst, 30)
        rep = nic(dst).report()
        assert rep["dma_count"] > received and rep["faults"] == 0 and not rep["driver_error"]
        assert rep["driver"]["corrupt"] == 0 and rep["driver"]["received"] > received - 4
        iommu(dst).check_invariants()
    finally:
        src.close()
        dst.close()


HUGE = {"spapr": {"iommu_page_shift": 24, "backing_shift": 24}}
SPLIT = {
    "spapr": {
        "iommu_page_shift": 24,
        "memslots": [{"size_mib": 32, "backing_shift": 24}, {"size_mib": 32, "backing_shift": 16}],
    }
}
TWO_WINDOWS: dict[str, Any] = {
    "tce_windows": [
        {"liobn": LIOBN, "offset": 0, "size_mib": 256, "page_shift": 16},
        {"liobn": DDW, "offset": 1 << 40, "size_mib": 1024, "page_shift": 24},
    ],
    "dma_devices": [
        {"name": "nic0", "liobn": LIOBN, "buffers": 4, "rate_mbps": 8},
        {"name": "nic1", "liobn": DDW, "buffers": 4, "rate_mbps": 8},
    ],
}


def test_destination_clears_and_counts_what_its_map_cannot_translate() -> None:
    src = dma_vm(HostContext("src", platform=HUGE), **TWO_WINDOWS)
    src.start()
    run(src, 20)
    assert nic(src, "nic1").report()["driver"]["received"] > 0  # fine on hugepage backing
    dst, ack, _ = migrate(src, HostContext("dst", platform=SPLIT))
    try:
        assert any("cannot back 5 mapped TCE entries" in w for w in ack["warnings"])
        rebuild = ack["post_load"]["spapr-tce"]["rebuild"]
        by_liobn = {w["liobn"]: w for w in rebuild["windows"]}
        assert by_liobn[LIOBN] == {"liobn": LIOBN, "mapped": 5, "cleared": 0}
        assert by_liobn[DDW] == {"liobn": DDW, "mapped": 0, "cleared": 5}
        assert rebuild["cleared"] == 5
        assert ack["digests"]["ram"] == state_digests(src)["ram"]
        assert ack["post_load"]["spapr-tce"]["invariants"] == "ok"
        digest = dst.ram.digest()
        run(dst, 20)
        stuck, fine = nic(dst, "nic1").report(), nic(dst, "nic0").report()
        assert stuck["faults"] == 1 and "unmapped" in stuck["halted"]
        assert fine["faults"] == 0 and fine["driver"]["corrupt"] == 0
        assert dst.ram.digest() != digest  # nic0 and the workload go on
        iommu(dst).check_invariants()
    finally:
        src.close()
        dst.close()


def test_destination_without_rebuild_is_refused_at_preflight() -> None:
    src = dma_vm()
    src.start()
    run(src, 2)
    upstream = create_vm(
        src.definition, HostContext("q", platform={"spapr": {"tce_mode": "no_rebuild"}})
    )
    try:
        source = SourceSession(src, MigrationParams(), ManualClock())
        with pytest.raises(MigrationRefused, match="does not rebuild"):
            source.preflight(upstream.capabilities())
        with pytest.raises(MigrationRefused, match="no sPAPR TCE"):
            source.preflight({})
    finally:
        src.close()
        upstream.close()


def test_a_replay_the_destination_cannot_do_fails_the_load() -> None:
    vm = dma_vm()
    handler = tce_handler(vm)
    try:
        alien = SpaprTceState((WindowState(0x42, 0, 12, 1, (0x10000 | 3).to_bytes(8, "big")),))
        handler.load(ComponentData("spapr-tce", encode_state(alien)))
        with pytest.raises(TceRestoreError, match="0x42"):
            handler.load_complete()
        handler.load_failed()
        with pytest.raises(MalformedRecord, match="no state"):
            handler.load_complete()
        handler.load(ComponentData("spapr-tce", b"STCE\x00\x07\x00\x00"))
        with pytest.raises(MalformedRecord.__mro__[1]):  # a StreamDecodeError
            handler.load_complete()
        assert handler.rebuild is None
    finally:
        vm.close()


def test_a_failed_replay_on_the_destination_gives_the_source_back() -> None:
    src = dma_vm()
    src.start()
    run(src, 10)

    def break_hardware(dst: VM) -> None:  # every exchange into the destination's table fails
        hw = iommu(dst).hw_tables(LIOBN)[0]
        hw.fail_xchg.update(range(hw.offset, hw.offset + hw.size))

    with pytest.raises(TceRestoreError, match="replay failed"):
        migrate(src, HostContext("dst"), before_finish=break_hardware)
    try:
        assert src.running  # the source resumed with its own tables
        iommu(src).check_invariants()
        received = nic(src).report()["driver"]["received"]
        run(src, 10)
        rep = nic(src).report()
        assert rep["driver"]["received"] > received and rep["faults"] == 0
    finally:
        src.close()


def test_without_the_dma_dirty_rule_pre_copy_loses_device_writes() -> None:
    """Device DMA bypasses the CPU's dirty log: only marking WRITE-mapped pages dirty
    (docs/models/spapr-tce.md §9.3 point 4) gets the pages a device wrote after they were sent
    across."""
    src = dma_vm()
    src.start()
    run(src, 20)
    tce_handler(src).untracked_liobns.clear()  # claim the device tracks its own dirty pages
    dst, ack, _ = migrate(src, HostContext("dst"))
    try:
        assert ack["digests"]["ram"] != state_digests(src)["ram"]
        lost = np.flatnonzero(
            (dst.ram.pages != src.ram.pages).any(axis=1)
        )  # only pages of the DMA area differ: the CPU's own writes were all tracked
        area = nic(src).driver.ring_gpa // PAGE_64K
        assert lost.size and (lost >= area).all()
    finally:
        src.close()
        dst.close()


# --- VFIO devices DMA through the TCE tables -------------------------------------------------

PDS = {"id": "blk0", "driver": "pds", "dma_region": [0x200000, 0x10000], "seed": 8}
DIRECT = {"liobn": DDW, "offset": 1 << 40, "size_mib": 64, "page_shift": 16}


def vfio_vm(host: HostContext | None = None, **extra: Any) -> VM:
    d = {
        "name": "ppc-vfio",
        "arch": "pseries",
        "memory_mib": 64,
        "vcpus": 2,
        "tce_windows": [DIRECT],
        "devices": [PDS],
        **extra,
    }
    return create_vm(d, host)


def test_vfio_devices_dma_through_the_tce_tables() -> None:
    vm = vfio_vm(workload={"dirty_rate_mbps": 0})
    try:
        io = iommu(vm)
        # the guest mapped all of RAM at IOBA = window offset + gpa (direct DMA over a DDW)
        assert vm.hcall(Hcall.H_GET_TCE, DDW, (1 << 40) + 0x210000).out == (0x210000 | 3,)
        assert io.hw_tables(DDW)[0].mapped_entries().size == 1024
        before = vm.ram.read(0x200000, 0x10000)
        vm.start()
        run(vm, 20)
        vfio = vm.handlers["vfio"]
        device = vfio.devices["blk0"].driver  # type: ignore[attr-defined]
        assert device.dma_writes > 0 and vm.ram.read(0x200000, 0x10000) != before
        io.check_invariants()
        # the guest takes the page away: the device's DMA there is refused, memory kept
        vm.pause()
        assert vm.hcall(Hcall.H_STUFF_TCE, DDW, (1 << 40) + 0x200000, 0, 1).ret == 0
        page = vm.ram.read(0x200000, 0x10000)
        vm.start()
        run(vm, 20)
        assert vm.ram.read(0x200000, 0x10000) == page
        assert io.dma_faults and io.dma_faults[-1].ioba >> 16 == ((1 << 40) + 0x200000) >> 16
        assert device.memory.faults > 0
    finally:
        vm.close()


def test_vfio_devices_on_pseries_need_a_window_covering_ram() -> None:
    with pytest.raises(ConfigError, match="covering"):
        vfio_vm(tce_windows=[{"liobn": LIOBN, "offset": 0, "size_mib": 32, "page_shift": 16}])


def test_a_pseries_vm_with_a_vfio_device_migrates_with_its_direct_mappings() -> None:
    src = vfio_vm(
        tce_windows=[{"liobn": LIOBN, "offset": 0, "size_mib": 256, "page_shift": 16}, DIRECT],
        dma_devices=[{"name": "nic0", "liobn": LIOBN, "buffers": 4, "rate_mbps": 8}],
    )
    assert iommu(src).hw_tables(DDW)[0].mapped_entries().size == 1024  # not nic0's window
    src.start()
    run(src, 20)
    dst, ack, _ = migrate(src, HostContext("dst"))
    try:
        assert ack["digests"] == state_digests(src)
        rebuild = ack["post_load"]["spapr-tce"]["rebuild"]
        assert rebuild["cleared"] == 0 and rebuild["mapped"] == 1024 + 5
        assert tce_handler(dst).untracked_liobns == {LIOBN}
        run(dst, 20)
        rep = nic(dst).report()
        assert rep["faults"] == 0 and rep["driver"]["corrupt"] == 0
        device = dst.handlers["vfio"].devices["blk0"].driver  # type: ignore[attr-defined]
        assert device.dma_writes > 0 and device.memory.faults == 0
        iommu(dst).check_invariants()
    finally:
        src.close()
        dst.close()


def test_devices_sharing_a_window_share_its_iobas() -> None:
    vm = vfio_vm(
        memory_mib=64,
        tce_windows=[{**DIRECT, "size_mib": 256}],
        dma_devices=[
            {"name": "nic0", "liobn": DDW, "buffers": 4, "rate_mbps": 8},
            {"name": "nic1", "liobn": DDW, "buffers": 4, "rate_mbps": 8},
        ],
        workload={"dirty_rate_mbps": 0},
    )
    try:
        vm.start()
        run(vm, 20)
        io = iommu(vm)
        # the direct mapping of RAM, then two rings with four buffers each, none clobbered
        assert io.hw_tables(DDW)[0].mapped_entries().size == 1024 + 2 * 5
        for name in ("nic0", "nic1"):
            rep = nic(vm, name).report()
            assert rep["faults"] == 0 and rep["driver"]["received"] > 4
            assert rep["driver"]["corrupt"] == 0
        io.check_invariants()
    finally:
        vm.close()
