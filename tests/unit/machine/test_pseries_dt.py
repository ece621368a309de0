"""The pseries device tree as a migration handler (in-process migrations between two hosts
whose platform descriptions differ)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libfdt
import pytest
from tests.unit.migration.test_engine import Link

from vmferry.cli.host import load_platform
from vmferry.errors import ConfigError, MalformedRecord, MigrationRefused
from vmferry.hw.devtree import load_fdt
from vmferry.hw.devtree.fdt import DevtreeStateError, save_tree
from vmferry.hw.devtree.fdt import encode_state as encode_tree
from vmferry.hw.spapr.platform import PlatformParams, generate_pseries_tree
from vmferry.hw.spapr.rtas import RtasFirmware
from vmferry.machine import pseries_dt
from vmferry.machine.handlers import ComponentData
from vmferry.machine.pseries_dt import (
    LpmState,
    decode_state,
    device_tree_handler,
    encode_state,
    tree_differences,
    tree_problems,
)
from vmferry.machine.vm import VM, HostContext, create_vm
from vmferry.migration.source import MigrationParams

A = HostContext("A", platform={"lpm": {"numa_domain": 0}})
B = HostContext("B", platform={"lpm": {
    "numa_domain": 1, "l2_size": 1 << 20, "cache_line": 64,
    "shared_interrupt_pool": 0xFFFFFFF1, "max_sync_cop_len": 0x2000}})


def definition(**dt: str) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "p", "arch": "pseries", "memory_mib": 64, "vcpus": 2,
                         "workload": {"dirty_rate_mbps": 20, "seed": 3}}
    if dt:
        d["device_tree"] = dt
    return d


def migrate(vm: VM, dest: HostContext = B, *, start: bool = True) -> tuple[VM, dict[str, Any]]:
    link = Link(vm, MigrationParams())
    link.dst.factory = lambda cfg: create_vm(cfg, dest)
    link.push(link.src.start())
    while bufs := link.src.next_buffers():
        link.push(bufs)
    link.dec.eof()
    ack = link.dst.finish(start=start)
    link.src.complete(ack)
    post = ack["post_load"] if start else link.dst.resume(run=False)
    assert link.dst.vm is not None
    return link.dst.vm, post["pseries-dt"]


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("lpm", [
    {"numa": 1}, {"numa_domain": -1}, {"numa_domain": True}, {"l2_size": 1 << 32},
    {"platform_facilities": 1}, {"system_id": ""}, {"system_id": 7}, "x",
])
def test_bad_platform_table_is_a_config_error(lpm: object) -> None:
    with pytest.raises(ConfigError):
        create_vm(definition(), HostContext("X", platform={"lpm": lpm}))


def test_platform_file_checked_when_loaded(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[lpm]\nnuma_domain = 2\nl3_size = 'big'\n")
    with pytest.raises(ConfigError, match="l3_size"):
        load_platform(path)
    path.write_text("[lpm]\nnuma_domain = 2\nplatform_facilities = false\n")
    assert load_platform(path)["lpm"]["numa_domain"] == 2


@pytest.mark.parametrize("dt", [{"mode": "nope"}, {"user_space": "later"}, {"x": 1}])
def test_bad_device_tree_options(dt: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        create_vm({**definition(), "device_tree": dt}, A)


def test_memory_not_whole_lmbs_refused() -> None:
    with pytest.raises(ConfigError, match="16 MiB"):
        create_vm({**definition(), "memory_mib": 40}, A)


def test_tree_generated_from_definition_and_host() -> None:
    vm = create_vm(definition(), B)
    h = device_tree_handler(vm)
    want = generate_pseries_tree(64, 2, lmb_size=64 << 20, numa_domain=1, l2_size=1 << 20,
                                 cache_line=64, shared_interrupt_pool=0xFFFFFFF1,
                                 max_sync_cop_len=0x2000)
    assert not tree_differences(h.tree, want, keep_facilities=False)
    assert h.report()["check"] == "ok"
    assert {d for d in h.vio.devices} >= {"ibm,random-v1", "ibm,compression-v1"}
    vm.close()


def test_generic_vm_has_no_tree() -> None:
    vm = create_vm({"name": "g", "memory_mib": 16})
    with pytest.raises(ConfigError, match="no device tree"):
        device_tree_handler(vm)
    vm.close()


# --- the component record ------------------------------------------------------------------


def test_record_round_trip_and_strict_decode() -> None:
    tree = generate_pseries_tree(256, 1)
    state = LpmState("A", PlatformParams(numa_domain=3), encode_tree(save_tree(tree)))
    data = encode_state(state)
    assert decode_state(data) == state
    bad = [data[:5], b"XLPM" + data[4:], data[:4] + b"\x00\x09" + data[6:],
           data[:-1], data[:10] + b"[" + data[11:],
           encode_state(LpmState("A", PlatformParams(), b"VFDT junk"))]
    for blob in bad:
        with pytest.raises(DevtreeStateError):
            decode_state(blob)


def test_bad_record_fails_the_load_and_changes_nothing() -> None:
    vm = create_vm(definition(), B)
    h = device_tree_handler(vm)
    before = h.dtb()
    h.load(ComponentData(h.name, b"VLPM\x00\x01garbage"))
    with pytest.raises(DevtreeStateError):
        h.load_complete()
    h.load_failed()
    assert h.dtb() == before and h.arrived is None and h.post_load() == {}
    with pytest.raises(MalformedRecord):
        h.load_complete()  # nothing pending any more
    vm.close()


# --- migrations ----------------------------------------------------------------------------


def test_update_runs_before_the_guest_and_matches_the_destination() -> None:
    vm = create_vm(definition(), A)
    vm.start()
    vm.run_slice(0.05)
    before = device_tree_handler(vm).dtb()
    dst, rep = migrate(vm)
    assert rep["ok"], rep
    assert rep["applied_at"] == "vm_start" and rep["guest_ran_before_update_s"] == 0.0
    assert rep["source_host"] == "A" and rep["destination_host"] == "B"
    assert "/cpus/l2-cache@2000" in rep["nodes_changed"]  # cache node deleted and re-added
    assert {"/memory@0:ibm,associativity", "/cpus/PowerPC,POWER9@1:ibm,associativity",
            "/rtas:ibm,max-associativity-domains"} <= set(rep["properties_changed"])
    assert f"/{pseries_dt.PLATFORM_FACILITIES}" in rep["ignored"]  # the seed patch
    assert rep["tree_check"] == "ok" and rep["matches_destination"] and not rep["hazards"]
    assert rep["exposure_window_s"] == 0.0 and rep["stale_user_runs"] == 0
    h = device_tree_handler(dst)
    after = h.dtb()
    assert after != before
    for blob in (before, after):
        libfdt.Fdt(blob)  # pylibfdt accepts both
    assert not tree_differences(load_fdt(after), h.platform_tree, keep_facilities=True)
    assert tree_differences(load_fdt(before), h.platform_tree, keep_facilities=True)
    assert dst.report()["pseries-dt"]["last_update"]["ok"]
    dst.close()


def test_there_and_back_again() -> None:
    vm = create_vm(definition(), A)
    original = device_tree_handler(vm).platform_tree
    vm.start()
    there, rep = migrate(vm, B)
    there.run_slice(0.01)
    back, rep2 = migrate(there, A)
    assert rep["ok"] and rep2["ok"] and rep2["source_host"] == "B"
    assert set(rep2["properties_changed"]) == set(rep["properties_changed"])
    # every part of the tree is A's again, the facilities included (kept since boot on A)
    assert not tree_differences(device_tree_handler(back).tree, original, keep_facilities=False)
    back.close()


def test_immediate_user_space_has_an_exposure_window() -> None:
    vm = create_vm(definition(user_space="immediate"), A)
    vm.start()
    _, rep = migrate(vm)
    assert rep["ok"] and rep["user_space"] == "immediate"
    assert rep["exposure_window_s"] > 0 and rep["stale_user_runs"] >= 1


def test_paused_arrival_updates_at_post_load() -> None:
    vm = create_vm(definition(), A)
    dst, rep = migrate(vm, start=False)
    assert rep["ok"] and rep["applied_at"] == "post_load"
    assert device_tree_handler(dst).post_load() is rep  # once only
    dst.close()


def test_same_platform_changes_nothing() -> None:
    vm = create_vm(definition(), A)
    vm.start()
    _, rep = migrate(vm, HostContext("A2", platform=A.platform))
    assert rep["ok"] and rep["matches_destination"]
    # the firmware still deletes and re-adds the facilities (the seed thread's firmware does)
    assert rep["nodes_changed"] == [] and rep["properties_changed"] == []
    assert f"/{pseries_dt.PLATFORM_FACILITIES}" in rep["ignored"]


def test_no_pf_skip_hazard_reported_not_raised() -> None:
    vm = create_vm(definition(mode="no_pf_skip"), A)
    vm.start()
    dst, rep = migrate(vm)
    assert not rep["ok"]
    kinds = {h["hazard"] for h in rep["hazards"]}
    assert "use-after-free" in kinds and "dangling-parent" in kinds
    assert rep["tree_check"] != "ok" and not rep["matches_destination"]
    assert any("ibm,random-v1" in d for d in rep["differences"])  # the lost children
    report = dst.report()["pseries-dt"]
    assert report["check"] != "ok" and not report["last_update"]["ok"]
    dst.run_slice(0.01)  # the guest runs on
    dst.close()


class _CorruptFirmware(RtasFirmware):
    """Destination firmware returning an update-nodes page whose count runs off the end."""

    def update_nodes(self, buf: bytearray, scope: int) -> int:
        rc = super().update_nodes(buf, scope)
        buf[16:20] = (0x0100_0FFF).to_bytes(4, "big")  # DELETE, 4095 phandles
        return rc


def test_malformed_work_area_reported_tree_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pseries_dt, "RtasFirmware", _CorruptFirmware)
    vm = create_vm(definition(), A)
    vm.start()
    dst, rep = migrate(vm)
    assert not rep["ok"] and rep["errors"], rep
    assert rep["tree_check"] == "ok"  # rejected whole, before any change
    assert not tree_problems(device_tree_handler(dst).tree)
    dst.close()


def test_failed_update_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("firmware fell over")

    monkeypatch.setattr(pseries_dt, "RtasFirmware", broken)
    vm = create_vm(definition(), A)
    vm.start()
    dst, rep = migrate(vm)
    assert not rep["ok"] and rep["errors"] == ["RuntimeError: firmware fell over"]
    assert not dst.report()["pseries-dt"]["last_update"]["ok"]
    dst.close()


def test_preflight() -> None:
    vm = create_vm(definition(), A)
    h = device_tree_handler(vm)
    dest_vm = create_vm(definition(), HostContext("C", platform={"lpm": {
        "platform_facilities": False}}))
    caps = dest_vm.capabilities()["pseries-dt"]
    warnings = h.preflight(caps, {})
    assert warnings and "ibm,random-v1" in warnings[0]
    other = create_vm(definition(), B)
    assert h.preflight(other.capabilities()["pseries-dt"], {}) == []
    other.close()
    for bad in (None, {}, {"platform": {"numa_domain": "x"}}):
        with pytest.raises(MigrationRefused):
            h.preflight(bad, {})
    vm.close()
    dest_vm.close()
