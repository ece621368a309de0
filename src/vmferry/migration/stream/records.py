"""Typed records of the stream: frozen dataclasses that validate themselves.

Each record knows how to turn itself into payload parts (``parts()``, zero-copy where the
data is large) and how to parse a payload (``parse``), raising
:class:`~vmferry.errors.MalformedRecord` on anything inconsistent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from vmferry.errors import MalformedRecord
from vmferry.hw.x86.state import KvmClockState, X86VcpuState
from vmferry.migration.stream import format as fmt
from vmferry.migration.stream.format import DevicePhase, RecordType

Buffer: TypeAlias = bytes | bytearray | memoryview


def _text(data: Buffer, what: str) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRecord(f"{what} is not UTF-8") from exc


@dataclass(frozen=True)
class VmConfig:
    TYPE: ClassVar[RecordType] = RecordType.VM_CONFIG
    config: dict[str, Any]

    def parts(self) -> list[Buffer]:
        return [json.dumps(self.config, sort_keys=True).encode()]

    @classmethod
    def parse(cls, payload: Buffer) -> VmConfig:
        try:
            config = json.loads(_text(payload, "VM configuration"))
        except json.JSONDecodeError as exc:
            raise MalformedRecord(f"VM configuration is not JSON: {exc.msg}") from exc
        except RecursionError as exc:
            raise MalformedRecord("VM configuration nests too deeply") from exc
        if not isinstance(config, dict):
            raise MalformedRecord("VM configuration is not a JSON object")
        return cls(config)


@dataclass(frozen=True)
class RamPages:
    """``npages`` raw pages at ``gpa``.  ``data`` may be a view into a decoder buffer."""

    TYPE: ClassVar[RecordType] = RecordType.RAM_PAGES
    gpa: int
    page_size: int
    data: Buffer

    @property
    def npages(self) -> int:
        return len(self.data) // self.page_size

    def parts(self) -> list[Buffer]:
        return [fmt.RAM_PAGES.pack(self.gpa, self.npages, self.page_size), self.data]

    @classmethod
    def parse(cls, payload: Buffer) -> RamPages:
        if len(payload) < fmt.RAM_PAGES.size:
            raise MalformedRecord("RAM_PAGES payload shorter than its header")
        gpa, npages, page_size = fmt.RAM_PAGES.unpack_from(payload)
        _check_pages(gpa, npages, page_size)
        if len(payload) - fmt.RAM_PAGES.size != npages * page_size:
            raise MalformedRecord(
                f"RAM_PAGES says {npages} pages of {page_size} but carries "
                f"{len(payload) - fmt.RAM_PAGES.size} bytes"
            )
        return cls(gpa, page_size, memoryview(payload)[fmt.RAM_PAGES.size :])


def _check_pages(gpa: int, npages: int, page_size: int) -> None:
    if page_size not in (4096, 65536):
        raise MalformedRecord(f"page size {page_size} is not 4096 or 65536")
    if gpa % page_size:
        raise MalformedRecord(f"gpa {gpa:#x} is not page aligned")
    if npages == 0:
        raise MalformedRecord("empty page run")


@dataclass(frozen=True)
class RamZero:
    TYPE: ClassVar[RecordType] = RecordType.RAM_ZERO
    gpa: int
    npages: int
    page_size: int

    def parts(self) -> list[Buffer]:
        return [fmt.RAM_ZERO.pack(self.gpa, self.npages, self.page_size)]

    @classmethod
    def parse(cls, payload: Buffer) -> RamZero:
        gpa, npages, page_size = fmt.RAM_ZERO.unpack(payload)
        _check_pages(gpa, npages, page_size)
        return cls(gpa, npages, page_size)


@dataclass(frozen=True)
class RamScatter:
    """Pages at scattered page numbers (ascending): their data, or all zero.

    ``pages`` is an int64 numpy array; ``data`` (``len(pages) * page_size`` bytes, empty
    for zero pages) may be a view into a decoder buffer.
    """

    TYPE: ClassVar[RecordType] = RecordType.RAM_SCATTER
    page_size: int
    pages: npt.NDArray[np.int64]
    data: Buffer
    zero: bool = False

    def parts(self) -> list[Buffer]:
        head = fmt.RAM_SCATTER.pack(self.pages.size, self.page_size, int(self.zero))
        return [head, self.pages.astype(">u8").tobytes(), self.data]

    @classmethod
    def parse(cls, payload: Buffer) -> RamScatter:
        if len(payload) < fmt.RAM_SCATTER.size:
            raise MalformedRecord("RAM_SCATTER payload shorter than its header")
        count, page_size, zero = fmt.RAM_SCATTER.unpack_from(payload)
        if page_size not in (4096, 65536) or zero > 1 or not 0 < count <= fmt.MAX_SCATTER_PAGES:
            raise MalformedRecord(f"RAM_SCATTER header ({count}, {page_size}, {zero}) invalid")
        start = fmt.RAM_SCATTER.size
        data_len = 0 if zero else count * page_size
        if len(payload) != start + 8 * count + data_len:
            raise MalformedRecord(f"RAM_SCATTER of {count} pages has the wrong length")
        pages = np.frombuffer(payload, ">u8", count, start).astype(np.int64)
        if pages.size > 1 and not bool((np.diff(pages) > 0).all()):
            raise MalformedRecord("RAM_SCATTER page numbers are not strictly increasing")
        return cls(page_size, pages, memoryview(payload)[start + 8 * count :], bool(zero))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, RamScatter) and self.page_size == other.page_size
                and self.zero == other.zero and np.array_equal(self.pages, other.pages)
                and bytes(self.data) == bytes(other.data))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class VcpuRecord:
    TYPE: ClassVar[RecordType] = RecordType.VCPU
    index: int
    regs: tuple[tuple[int, int], ...]

    def parts(self) -> list[Buffer]:
        out = bytearray(fmt.VCPU.pack(self.index, len(self.regs)))
        for reg, value in self.regs:
            out += fmt.REG.pack(reg, value)
        return [bytes(out)]

    @classmethod
    def parse(cls, payload: Buffer) -> VcpuRecord:
        if len(payload) < fmt.VCPU.size:
            raise MalformedRecord("VCPU payload shorter than its header")
        index, count = fmt.VCPU.unpack_from(payload)
        if len(payload) != fmt.VCPU.size + count * fmt.REG.size:
            raise MalformedRecord(f"VCPU {index} says {count} registers, length disagrees")
        regs = tuple(
            fmt.REG.unpack_from(payload, fmt.VCPU.size + i * fmt.REG.size) for i in range(count)
        )
        ids = [r for r, _ in regs]
        if len(set(ids)) != len(ids):
            raise MalformedRecord(f"VCPU {index} repeats a register id")
        return cls(index, regs)


@dataclass(frozen=True)
class DeviceChunk:
    TYPE: ClassVar[RecordType] = RecordType.DEVICE
    device: str
    phase: DevicePhase
    seq: int
    data: Buffer

    def parts(self) -> list[Buffer]:
        ident = self.device.encode()
        if not 0 < len(ident) <= 255:
            raise MalformedRecord(f"device id {self.device!r} must be 1..255 bytes")
        return [fmt.DEVICE.pack(len(ident), self.phase, 0, self.seq) + ident, self.data]

    @classmethod
    def parse(cls, payload: Buffer) -> DeviceChunk:
        if len(payload) < fmt.DEVICE.size:
            raise MalformedRecord("DEVICE payload shorter than its header")
        id_len, phase, reserved, seq = fmt.DEVICE.unpack_from(payload)
        if reserved or id_len == 0 or len(payload) < fmt.DEVICE.size + id_len:
            raise MalformedRecord("DEVICE header is inconsistent")
        try:
            ph = DevicePhase(phase)
        except ValueError as exc:
            raise MalformedRecord(f"DEVICE phase {phase} is unknown") from exc
        start = fmt.DEVICE.size + id_len
        device = _text(memoryview(payload)[fmt.DEVICE.size : start], "device id")
        return cls(device, ph, seq, bytes(memoryview(payload)[start:]))


@dataclass(frozen=True)
class ComponentRecord:
    TYPE: ClassVar[RecordType] = RecordType.COMPONENT
    name: str
    data: Buffer

    def parts(self) -> list[Buffer]:
        ident = self.name.encode()
        if not 0 < len(ident) <= 255:
            raise MalformedRecord(f"component name {self.name!r} must be 1..255 bytes")
        return [fmt.COMPONENT.pack(len(ident)) + ident, self.data]

    @classmethod
    def parse(cls, payload: Buffer) -> ComponentRecord:
        if len(payload) < fmt.COMPONENT.size:
            raise MalformedRecord("COMPONENT payload shorter than its header")
        (n,) = fmt.COMPONENT.unpack_from(payload)
        if n == 0 or len(payload) < fmt.COMPONENT.size + n:
            raise MalformedRecord("COMPONENT name length is inconsistent")
        name = _text(memoryview(payload)[fmt.COMPONENT.size : fmt.COMPONENT.size + n], "name")
        return cls(name, bytes(memoryview(payload)[fmt.COMPONENT.size + n :]))


@dataclass(frozen=True)
class X86VcpuRecord:
    """One x86-64 vCPU's whole KVM state: REGS, SREGS, FPU, XSAVE, XCRS, VCPU_EVENTS,
    MP_STATE, every MSR and the CPUID it was given (versioned layout in
    :mod:`vmferry.hw.x86.state`)."""

    TYPE: ClassVar[RecordType] = RecordType.X86_VCPU
    data: bytes

    @property
    def state(self) -> X86VcpuState:
        return X86VcpuState.decode(self.data)

    def parts(self) -> list[Buffer]:
        return [self.data]

    @classmethod
    def parse(cls, payload: Buffer) -> X86VcpuRecord:
        data = bytes(payload)
        X86VcpuState.decode(data)  # validates the layout
        return cls(data)


@dataclass(frozen=True)
class KvmClockRecord:
    """The VM's KVM clock (versioned layout in :mod:`vmferry.hw.x86.state`)."""

    TYPE: ClassVar[RecordType] = RecordType.KVM_CLOCK
    data: bytes

    @property
    def state(self) -> KvmClockState:
        return KvmClockState.decode(self.data)

    def parts(self) -> list[Buffer]:
        return [self.data]

    @classmethod
    def parse(cls, payload: Buffer) -> KvmClockRecord:
        data = bytes(payload)
        KvmClockState.decode(data)
        return cls(data)


@dataclass(frozen=True)
class PassEnd:
    TYPE: ClassVar[RecordType] = RecordType.PASS_END
    number: int
    pages: int

    def parts(self) -> list[Buffer]:
        return [fmt.PASS_END.pack(self.number, self.pages)]

    @classmethod
    def parse(cls, payload: Buffer) -> PassEnd:
        return cls(*fmt.PASS_END.unpack(payload))


@dataclass(frozen=True)
class End:
    TYPE: ClassVar[RecordType] = RecordType.END

    def parts(self) -> list[Buffer]:
        return []

    @classmethod
    def parse(cls, payload: Buffer) -> End:
        return cls()


Record: TypeAlias = (
    VmConfig | RamPages | RamZero | RamScatter | VcpuRecord | DeviceChunk | ComponentRecord
    | PassEnd | End | X86VcpuRecord | KvmClockRecord
)

#: ArchState kinds (see :class:`vmferry.machine.handlers.ArchState`) and their records
ARCH_RECORDS: dict[str, type[X86VcpuRecord] | type[KvmClockRecord]] = {
    "x86_vcpu": X86VcpuRecord,
    "kvm_clock": KvmClockRecord,
}

PARSERS: dict[RecordType, Callable[[Buffer], Record]] = {
    RecordType.VM_CONFIG: VmConfig.parse,
    RecordType.RAM_PAGES: RamPages.parse,
    RecordType.RAM_ZERO: RamZero.parse,
    RecordType.VCPU: VcpuRecord.parse,
    RecordType.DEVICE: DeviceChunk.parse,
    RecordType.COMPONENT: ComponentRecord.parse,
    RecordType.PASS_END: PassEnd.parse,
    RecordType.END: End.parse,
    RecordType.RAM_SCATTER: RamScatter.parse,
    RecordType.X86_VCPU: X86VcpuRecord.parse,
    RecordType.KVM_CLOCK: KvmClockRecord.parse,
}
