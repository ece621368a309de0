"""Summarise a saved stream, in the spirit of QEMU's analyze-migration.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vmferry.migration.stream.codec import StreamDecoder
from vmferry.migration.stream.records import (
    Buffer,
    ComponentRecord,
    DeviceChunk,
    KvmClockRecord,
    PassEnd,
    RamPages,
    RamScatter,
    RamZero,
    VcpuRecord,
    VmConfig,
    X86VcpuRecord,
)


@dataclass
class StreamSummary:
    version: tuple[int, int] = (0, 0)
    bytes: int = 0
    records: Counter[str] = field(default_factory=Counter)
    vm: dict[str, Any] = field(default_factory=dict)
    pages_raw: int = 0
    pages_zero: int = 0
    page_bytes: int = 0
    passes: list[dict[str, int]] = field(default_factory=list)
    vcpus: dict[int, int] = field(default_factory=dict)  # index -> register count
    devices: dict[str, dict[str, int]] = field(default_factory=dict)
    components: dict[str, int] = field(default_factory=dict)
    x86_vcpus: list[dict[str, Any]] = field(default_factory=list)
    kvm_clock_ns: int | None = None
    complete: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "version": f"{self.version[0]}.{self.version[1]}",
            "bytes": self.bytes,
            "complete": self.complete,
            "records": dict(self.records),
            "vm": self.vm,
            "ram": {
                "pages_raw": self.pages_raw,
                "pages_zero": self.pages_zero,
                "raw_bytes": self.page_bytes,
            },
            "passes": self.passes,
            "vcpus": {str(k): v for k, v in sorted(self.vcpus.items())},
            "devices": self.devices,
            "components": self.components,
            **({"x86_vcpus": self.x86_vcpus} if self.x86_vcpus else {}),
            **({"kvm_clock_ns": self.kvm_clock_ns} if self.kvm_clock_ns is not None else {}),
        }


def summarize(chunks: Iterable[Buffer]) -> StreamSummary:
    """Decode a whole stream; raises the decoder's typed error on anything invalid."""
    s = StreamSummary()
    dec = StreamDecoder()
    for chunk in chunks:
        s.bytes += len(chunk)
        dec.feed(chunk)
        for rec in dec.events():
            _account(s, rec)
    dec.eof()
    s.version = dec.version or (0, 0)
    s.complete = dec.done
    return s


def _account(s: StreamSummary, rec: object) -> None:
    s.records[type(rec).__name__] += 1
    if isinstance(rec, VmConfig):
        s.vm = rec.config
    elif isinstance(rec, RamPages):
        s.pages_raw += rec.npages
        s.page_bytes += len(rec.data)
    elif isinstance(rec, RamZero):
        s.pages_zero += rec.npages
    elif isinstance(rec, RamScatter):
        if rec.zero:
            s.pages_zero += rec.pages.size
        else:
            s.pages_raw += rec.pages.size
            s.page_bytes += len(rec.data)
    elif isinstance(rec, PassEnd):
        s.passes.append({"pass": rec.number, "pages": rec.pages})
    elif isinstance(rec, VcpuRecord):
        s.vcpus[rec.index] = len(rec.regs)
    elif isinstance(rec, DeviceChunk):
        dev = s.devices.setdefault(rec.device, {"chunks": 0, "bytes": 0})
        dev["chunks"] += 1
        dev["bytes"] += len(rec.data)
    elif isinstance(rec, ComponentRecord):
        s.components[rec.name] = len(rec.data)
    elif isinstance(rec, X86VcpuRecord):
        s.x86_vcpus.append(rec.state.summary())
    elif isinstance(rec, KvmClockRecord):
        s.kvm_clock_ns = rec.state.clock_ns
