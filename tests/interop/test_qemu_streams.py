"""Issue 12: real QEMU 7.2 migration streams, read byte for byte and checked.

Streams come from a real QEMU started per session (``conftest.qemu_stream``: TCG for
pc, q35, arm64 virt and pseries; KVM for pc and q35 where /dev/kvm is usable) and from
the small fixtures in ``tests/fixtures/qemu`` (made by ``make.py`` there).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.interop.conftest import CASES, case_ids, fixture_bytes, fixture_meta
from tests.interop.qemu_runner import Made
from tests.interop.transform import set_tce_entries
from vmferry.analysis.matrix import CellSpec, run_cell
from vmferry.cli.main import cli
from vmferry.errors import StreamDecodeError
from vmferry.hw.devtree import load_fdt
from vmferry.hw.kvm import regs as R
from vmferry.interop.qemu import check_stream, read_stream
from vmferry.machine.profiles import load_profile
from vmferry.migration.stream import End, RamZero, StreamEncoder, VmConfig

Get = Callable[[str, str], Made]


# --- item 1 and 5: real streams, to the end, against QEMU's own counters ---------------------


@pytest.mark.parametrize(("machine", "accel"), CASES, ids=case_ids())
def test_item1_item5_real_stream_read_to_the_end(qemu_stream: Get, machine: str,
                                                 accel: str) -> None:
    made = qemu_stream(machine, accel)
    data = made.path.read_bytes()
    s = read_stream(data)
    assert s.version == 3 and s.size == len(data) and s.complete
    assert s.machine.startswith({"pc": "pc-i440fx-", "q35": "pc-q35-", "virt": "virt-",
                                 "pseries": "pseries-"}[machine])
    assert s.ram is not None
    assert (s.ram.zero_pages, s.ram.normal_pages) == (made.ram["duplicate"], made.ram["normal"])
    assert s.ram.total == made.ram["total"] == sum(b.length for b in s.ram.blocks.values())
    assert s.ram.normal_pages * s.ram.page_size == made.ram["normal-bytes"]
    # every piece of every section was closed by its footer; iterative ones were ENDed
    assert all(sec.ended for sec in s.sections.values())
    assert [t for t, _, _ in s.order][-1] == "eof"


@pytest.mark.parametrize(("machine", "accel"), CASES, ids=case_ids())
def test_item5_sections_match_the_description(qemu_stream: Get, machine: str,
                                              accel: str) -> None:
    s = read_stream(qemu_stream(machine, accel).path.read_bytes())
    assert s.description is not None
    declared = [(d["name"], d["instance_id"]) for d in s.description["devices"]]
    described = [(x.idstr, x.instance_id) for x in s.sections.values() if x.kind == "vmstate"]
    assert described == declared
    others = {x.idstr for x in s.sections.values() if x.kind != "vmstate"}
    assert others == ({"ram", "spapr/htab"} if machine == "pseries" else {"ram"})


def test_item1_pseries_carries_htab_tce_tables_and_device_tree(qemu_stream: Get) -> None:
    s = read_stream(qemu_stream("pseries", "tcg").path.read_bytes())
    assert s.htab is not None and s.htab.shift is not None and s.htab.shift >= 18
    liobns = {t.window.liobn for t in s.tce_tables}
    assert 0x80000000 in liobns  # the default PHB's 32-bit window
    assert any(t.window.nb_table for t in s.tce_tables)
    assert len(s.tce_tables) == len(s.section_named("spapr_iommu"))
    dt = s.device_tree
    assert dt is not None and dt.blob[:4] == b"\xd0\x0d\xfe\xed"
    names = {n.name for n in dt.tree.walk()}
    assert {"cpus", "rtas", "chosen"} <= names
    assert sum(1 for _ in load_fdt(dt.blob).walk()) == sum(1 for _ in dt.tree.walk())


def test_item2_arm64_tcg_stream_has_no_firmware_registers(qemu_stream: Get) -> None:
    s = read_stream(qemu_stream("virt", "tcg").path.read_bytes())
    (cpu,) = s.cpu_registers
    assert len(cpu.cpregs.ids) > 100 and cpu.firmware() == []
    assert "TCG" in cpu.to_json()["note"]


# --- fixtures --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pc", "virt", "pseries"])
def test_item5_fixtures_match_the_counters_qemu_reported(name: str) -> None:
    meta = fixture_meta()[name]
    s = read_stream(fixture_bytes(name))
    assert s.complete and s.size == meta["size"]
    assert s.ram is not None
    assert (s.ram.zero_pages, s.ram.normal_pages) == (meta["duplicate"], meta["normal"])


# --- item 2: the report --------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_item2_json_report(tmp_path: Path) -> None:
    path = tmp_path / "pseries.qevm"
    path.write_bytes(fixture_bytes("pseries"))
    code, out, _ = _cli("stream", "inspect", str(path), "--json")
    assert code == 0
    j = json.loads(out)
    assert (j["format"], j["version"], j["size"], j["complete"]) == (
        "qemu", 3, path.stat().st_size, True)
    assert {"name", "length"} <= set(j["ram"]["blocks"][0])
    assert j["ram"]["zero_pages"] + j["ram"]["normal_pages"] > 0
    assert all({"idstr", "instance_id", "version_id", "bytes"} <= set(x) for x in j["sections"])
    assert sum(x["bytes"] for x in j["sections"]) < j["size"]
    tce = j["tce_tables"][0]
    assert {"liobn", "bus_offset", "page_shift", "entries", "nonzero_entries"} <= set(tce)
    assert j["device_tree"]["nodes"] > 5 and j["device_tree"]["properties"] > 20


def test_item2_text_summary_and_arm64_registers(tmp_path: Path) -> None:
    path = tmp_path / "virt.qevm"
    path.write_bytes(fixture_bytes("virt-kvmfw"))
    code, out, _ = _cli("stream", "inspect", str(path))
    out = " ".join(out.split())  # rich wraps at the terminal width
    assert code == 0
    assert "QEMU stream v3 (virt-7.2)" in out and "every byte accounted for" in out
    assert "PSCI_VERSION=0x10003" in out
    j = json.loads(_cli("stream", "inspect", str(path), "--json")[1])
    regs = {r["name"]: r["value"] for r in j["cpu_registers"][0]["firmware_registers"]}
    assert regs["PSCI_VERSION"] == 0x10003 and "SMCCC_ARCH_WORKAROUND_1" in regs


def test_item2_vmferry_streams_still_inspect(tmp_path: Path) -> None:
    path = tmp_path / "own.vmf"
    path.write_bytes(StreamEncoder().encode_all(
        [VmConfig({"name": "s", "memory_mib": 4}), RamZero(0, 3, 4096), End()]))
    code, out, _ = _cli("stream", "inspect", str(path), "--json")
    assert code == 0 and json.loads(out)["ram"]["pages_zero"] == 3


# --- item 3: checks --------------------------------------------------------------------------


def test_item3_tce_entries_go_through_the_tce_model() -> None:
    base = fixture_bytes("pseries")
    ram = 256 << 20
    entries = {0: 0x1000 | 3, 1: 0x2000 | 1, 2: 0x3004 | 2, 3: ram | 3, 4: 0xDEAD0000}
    s = read_stream(set_tce_entries(base, 0x80000000, entries))
    table = next(t for t in s.tce_tables if t.window.liobn == 0x80000000)
    assert table.to_json()["nonzero_entries"] == 5
    found = [f for f in check_stream(s) if f.section == "spapr_iommu liobn 0x80000000"]
    assert table.entries_offset is not None
    errors = {f.offset: f for f in found if f.severity == "error" and "entry" in f.message}
    assert set(errors) == {table.entries_offset + 16, table.entries_offset + 24}
    assert "not aligned" in errors[table.entries_offset + 16].message
    assert errors[table.entries_offset + 16].value == f"{0x3006:#018x}"
    assert "outside guest RAM" in errors[table.entries_offset + 24].message
    poison = [f for f in found if f.severity == "note"]
    assert [f.offset for f in poison] == [table.entries_offset + 32]
    summary = found[-1]
    assert summary.severity == "error" and summary.value == "4/262144"


def test_item3_device_tree_and_lpm_update(tmp_path: Path) -> None:
    path = tmp_path / "pseries.qevm"
    path.write_bytes(fixture_bytes("pseries"))
    platform = tmp_path / "dest.toml"
    platform.write_text('[lpm]\nnuma_domain = 1\nsystem_id = "IBM,02DEST"\n')
    code, out, _ = _cli("stream", "check", str(path), "--platform", str(platform), "--json")
    assert code == 0, out
    j = json.loads(out)
    dt = [f for f in j["findings"] if f["check"] == "device-tree"]
    assert dt[-1]["severity"] == "ok" and "reference counts balance" in dt[-1]["message"]
    lpm = [f for f in j["findings"] if f["check"] == "lpm-update"]
    assert any(f["message"].startswith("add ") for f in lpm)
    assert "IBM,02DEST" in lpm[-1]["message"]
    assert all(f["offset"] == dt[0]["offset"] for f in lpm)


@pytest.mark.parametrize("destination", ["arm64-linux-4.15", "arm64-linux-5.3",
                                         "arm64-linux-5.19", "arm64-linux-6.13"])
def test_item3_arm64_firmware_verdicts_match_the_matrix(destination: str) -> None:
    source = fixture_meta()["virt-kvmfw"]["profile"]
    assert isinstance(source, str)
    s = read_stream(fixture_bytes("virt-kvmfw"))
    (verdict,) = [f for f in check_stream(s, profile=load_profile(destination))
                  if f.check == "arm64-firmware" and f.severity != "note"]
    cell = run_cell(CellSpec(source, destination, "default", "avail", "avail"))
    assert cell is not None
    if cell.outcome == "migrates":
        assert verdict.severity == "ok"
    else:
        assert cell.outcome == "refused" and verdict.severity == "error"
        assert cell.register is not None
        (cpu,) = s.cpu_registers
        rid = next(r for r in cpu.cpregs.ids if R.register_name(r) == cell.register)
        pos = cpu.cpregs.ids.index(rid)
        assert verdict.offset == cpu.values_offset + 8 * pos
        assert verdict.value == f"{cpu.cpregs.values[pos]:#x}"


def test_item3_check_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "virt.qevm"
    path.write_bytes(fixture_bytes("virt-kvmfw"))
    assert _cli("stream", "check", str(path), "--profile", "arm64-linux-6.13")[0] == 0
    code, out, _ = _cli("stream", "check", str(path), "--profile", "arm64-linux-4.15")
    assert code == 1 and "refuse" in out
    assert _cli("stream", "check", str(path), "--profile", "no-such")[0] == 2


# --- item 4: bad input -----------------------------------------------------------------------


def _boundaries(data: bytes) -> list[int]:
    s = read_stream(data)
    cuts = {off for _, _, off in s.order} | {sec.offset + 1 for sec in s.sections.values()}
    cuts |= {f.offset + 1 for sec in s.sections.values() for f in sec.fields.values()}
    return sorted(c for c in cuts if 0 < c < len(data))


def test_item4_truncated_anywhere_names_the_offset() -> None:
    data = fixture_bytes("virt")
    cuts = _boundaries(data)
    cuts += list(range(0, 64)) + list(np.linspace(64, len(data) - 1, 300).astype(int))
    for cut in sorted(set(cuts)):
        with pytest.raises(StreamDecodeError) as ei:
            read_stream(data[:cut])
        assert ei.value.offset is not None and 0 <= ei.value.offset <= cut, cut
        assert "expected" in str(ei.value), str(ei.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 421980), st.integers(0, 7)), min_size=1,
                max_size=4))
def test_item4_bit_flips_decode_or_fail_typed(flips: list[tuple[int, int]]) -> None:
    data = bytearray(_VIRT)
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    try:
        read_stream(bytes(data))
    except StreamDecodeError as exc:
        assert exc.offset is not None and 0 <= exc.offset <= len(data)


_VIRT = fixture_bytes("virt")


def _patched(data: bytes, offset: int, raw: bytes) -> bytes:
    return data[:offset] + raw + data[offset + len(raw):]


@pytest.mark.parametrize(("what", "offset", "raw", "expect"), [
    ("magic", 0, b"QEVX", "expected magic 'QEVM'"),
    ("version", 4, struct.pack(">I", 2), "expected 3"),
    ("config name length", 9, b"\xff\xff\xff\xff", "machine name (4294967295 bytes)"),
    ("section type", 8, b"\x42", "expected a section type"),
])
def test_item4_hostile_header_fields(what: str, offset: int, raw: bytes, expect: str) -> None:
    with pytest.raises(StreamDecodeError) as ei:
        read_stream(_patched(_VIRT, offset, raw))
    assert expect in str(ei.value), what


def test_item4_hostile_ram_and_description_lengths() -> None:
    s = read_stream(_VIRT)
    ram = next(x for x in s.sections.values() if x.idstr == "ram")
    hdr = ram.offset + 1 + 4 + 1 + 3 + 8  # type, id, "ram", instance, version
    with pytest.raises(StreamDecodeError, match="at most the"):
        read_stream(_patched(_VIRT, hdr, struct.pack(">Q", (1 << 60) | 0x04)))
    # an array length in the description far beyond the file
    assert s.description is not None and s.description_offset is not None
    desc = json.loads(json.dumps(s.description))
    desc["devices"][0]["fields"][0]["array_len"] = 1 << 40
    text = json.dumps(desc).encode()
    bad = _VIRT[:s.description_offset] + b"\x06" + struct.pack(">I", len(text)) + text
    with pytest.raises(StreamDecodeError, match="truncated: expected field"):
        read_stream(bad)


@pytest.mark.parametrize("size", [0, 3, 8, 100, 5000])
def test_item4_garbage(size: int) -> None:
    rng = np.random.default_rng(size)
    for head in (b"", b"QEVM\x00\x00\x00\x03"):
        data = head + rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        with pytest.raises(StreamDecodeError):
            read_stream(data)


def test_item4_cli_prints_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.qevm"
    path.write_bytes(_VIRT[:200_000])
    code, out, err = _cli("stream", "inspect", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "at byte" in err and "Traceback" not in err


def _with_description(data: bytes, edit: Callable[[dict[str, object]], None]) -> bytes:
    s = read_stream(data)
    assert s.description is not None and s.description_offset is not None
    desc = json.loads(json.dumps(s.description))
    edit(desc)
    text = json.dumps(desc).encode()
    return data[:s.description_offset] + b"\x06" + struct.pack(">I", len(text)) + text


def test_item4_hostile_description_cannot_hang() -> None:
    def empty_structs(desc: dict[str, object]) -> None:
        devices = desc["devices"]
        assert isinstance(devices, list)
        devices[0]["fields"] = [{"name": "x", "type": "struct", "array_len": 10**12,
                                 "struct": {"vmsd_name": "x", "version": 1, "fields": [],
                                            "subsections": [{"vmsd_name": "x/y",
                                                             "version": 1, "fields": []}]}}]

    with pytest.raises(StreamDecodeError, match="elements of struct x"):
        read_stream(_with_description(_VIRT, empty_structs))

    def not_json(desc: dict[str, object]) -> None:
        desc["devices"] = "nope"

    with pytest.raises(StreamDecodeError, match="devices list"):
        read_stream(_with_description(_VIRT, not_json))
