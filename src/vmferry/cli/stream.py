"""``vmferry stream inspect|check``: decode a saved stream (vmferry's own or QEMU's).

A file that opens with ``QEVM`` is a QEMU migration stream and is read with
:mod:`vmferry.interop.qemu` (mapped, not read into memory); anything else is a vmferry
stream.  ``check`` runs vmferry's model checks on what a QEMU stream carries.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from vmferry.cli.common import JSON_OPTION, console, emit_json, esc, human_bytes
from vmferry.errors import ConfigError, StreamDecodeError
from vmferry.interop.qemu import QemuStream, check_stream, is_qemu_stream, read_stream
from vmferry.migration.stream.inspect import summarize

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("stream")
def command() -> None:
    """Work with saved migration streams (vmferry's own, or QEMU's "QEVM" streams)."""


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            yield chunk


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[Any]:
    """The file's bytes without reading them into memory (an empty file: b"")."""
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            yield b""
            return
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield m
        finally:
            with contextlib.suppress(BufferError):  # a stray view: the OS unmaps on exit
                m.close()


def _read_qemu(file: Path) -> QemuStream:
    try:
        with _mapped(file) as data:
            return read_stream(data)
    except StreamDecodeError as exc:
        click.echo(f"vmferry: {file}: invalid QEMU stream: {type(exc).__name__}: {exc}",
                   err=True)
        sys.exit(2)


@command.command("inspect")
@click.argument("file", type=FILE)
@JSON_OPTION
def inspect(file: Path, as_json: bool) -> None:
    """Decode FILE and summarise records, pages, bytes, vCPUs and devices."""
    if is_qemu_stream(_head(file)):
        s = _read_qemu(file)
        if as_json:
            emit_json(s.to_json())
        else:
            _print_qemu(file, s)
        return
    try:
        v = summarize(_chunks(file))
    except StreamDecodeError as exc:
        click.echo(f"vmferry: {file}: invalid stream: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    if as_json:
        emit_json(v.to_json())
        return
    vm = v.vm
    console.print(
        f"[bold]{esc(file)}[/]: vmferry stream v{v.version[0]}.{v.version[1]}, "
        f"{human_bytes(v.bytes)}, VM {esc(vm.get('name'))} ({esc(vm.get('arch'))}, "
        f"{esc(vm.get('memory_mib'))} MiB, {esc(vm.get('vcpus'))} vCPUs)"
    )
    table = Table("record", "count")
    for name, count in sorted(v.records.items()):
        table.add_row(esc(name), str(count))
    console.print(table)
    console.print(
        f"RAM: {v.pages_raw} raw pages ({human_bytes(v.page_bytes)}), "
        f"{v.pages_zero} zero pages, {len(v.passes)} passes"
    )
    console.print(
        f"vCPUs: {len(v.vcpus)}; devices: {len(v.devices)}; "
        f"components: {esc(', '.join(v.components)) or 'none'}"
    )
    for x in v.x86_vcpus:
        console.print(
            f"x86 vCPU {x['vcpu']} (KVM state): rip {x['rip']}, rflags {x['rflags']}, "
            f"{x['msrs']} MSRs, XSAVE {x['xsave_bytes']} bytes, "
            f"{x['cpuid_entries']} CPUID entries"
        )
    if v.kvm_clock_ns is not None:
        console.print(f"KVM clock: {v.kvm_clock_ns} ns")


def _print_qemu(file: Path, s: QemuStream) -> None:
    j = s.to_json()
    console.print(f"[bold]{escape(str(file))}[/]: QEMU stream v{s.version} ({escape(s.machine)}), "
                  f"{human_bytes(s.size)}, "
                  + ("every byte accounted for" if s.complete else
                     f"{s.size - s.accounted} bytes not accounted for"))
    if s.ram is not None:
        r = s.ram
        console.print(f"RAM: {human_bytes(r.total)} in {len(r.blocks)} blocks, "
                      f"{r.normal_pages} normal pages, {r.zero_pages} zero pages"
                      + (f", {r.xbzrle_pages} XBZRLE" if r.xbzrle_pages else "")
                      + (f", {r.compressed_pages} compressed" if r.compressed_pages else "")
                      + f" ({r.page_size} byte pages)")
        for b in r.blocks.values():
            console.print(f"  {escape(b.name)}: {human_bytes(b.length)}, "
                          f"{b.normal_pages} normal, {b.zero_pages} zero")
    table = Table("section", "instance", "version", "kind", "pieces", "bytes")
    for sec in s.sections.values():
        table.add_row(escape(sec.idstr), str(sec.instance_id), str(sec.version_id), sec.kind,
                      str(sec.parts), str(sec.bytes))
    console.print(table)
    if s.htab is not None:
        h = s.htab
        console.print("spapr/htab: " + ("no hashed page table" if h.shift is None else
                      f"2^{h.shift} bytes, {h.chunks} chunks, {h.valid} valid entries"))
    for t in j.get("tce_tables", []):
        console.print(f"TCE table liobn {t['liobn_hex']}: window {t['bus_offset']:#x}+"
                      f"{t['window_size']:#x}, page shift {t['page_shift']}, {t['entries']} "
                      f"entries, {t['nonzero_entries']} non-zero")
    if "device_tree" in j:
        d = j["device_tree"]
        console.print(f"device tree: {d['bytes']} bytes, {d['nodes']} nodes, "
                      f"{d['properties']} properties (at byte {d['offset']})")
    for c in j.get("cpu_registers", []):
        fw = ", ".join(f"{r['name']}={r['value_hex']}" for r in c["firmware_registers"])
        console.print(f"cpu {c['instance_id']}: {c['count']} registers; "
                      + (f"firmware: {fw}" if fw else escape(c["note"])))
    if s.description is not None:
        console.print(f"VM description: {len(s.description.get('devices', []))} devices, "
                      f"at byte {s.description_offset}")


@command.command("check")
@click.argument("file", type=FILE)
@click.option("--platform", "platform_file", type=FILE,
              help="destination host platform (TOML with an [lpm] table): print the LPM "
                   "update its firmware would send")
@click.option("--profile", help="destination arm64 host profile (see `vmferry matrix`)")
@JSON_OPTION
def check(file: Path, platform_file: Path | None, profile: str | None, as_json: bool) -> None:
    """Run vmferry's checks on what a QEMU stream FILE carries (exit 1 on any error)."""
    from vmferry.cli.host import load_platform
    from vmferry.machine.profiles import load_profile

    if not is_qemu_stream(_head(file)):
        click.echo(f"vmferry: {file}: not a QEMU stream (expected magic 'QEVM'); "
                   "`stream inspect` reads vmferry streams", err=True)
        sys.exit(2)
    try:
        platform = load_platform(platform_file) if platform_file is not None else None
        host = load_profile(profile) if profile is not None else None
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc
    s = _read_qemu(file)
    findings = check_stream(s, platform=platform, profile=host)
    errors = sum(1 for f in findings if f.severity == "error")
    if as_json:
        emit_json({"file": str(file), "machine": s.machine, "errors": errors,
                   "findings": [f.to_json() for f in findings]})
    else:
        colour = {"error": "red", "warning": "yellow", "ok": "green", "note": "cyan"}
        for f in findings:
            where = f"{f.section} @ {f.offset}" if f.offset is not None else f.section
            console.print(f"[{colour[f.severity]}]{f.severity:7}[/] {f.check:14} "
                          f"{escape(where)} [{escape(f.value)}] {escape(f.message)}")
        console.print(f"{len(findings)} findings, {errors} errors")
    if errors:
        sys.exit(1)
