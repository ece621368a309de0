"""The vmferry migration stream: versioned, typed, checksummed records (sans-IO)."""

from vmferry.migration.stream.codec import NEED_DATA, StreamDecoder, StreamEncoder
from vmferry.migration.stream.format import MAJOR, MINOR, DevicePhase, RecordType
from vmferry.migration.stream.records import (
    ComponentRecord,
    DeviceChunk,
    End,
    KvmClockRecord,
    PassEnd,
    RamPages,
    RamScatter,
    RamZero,
    Record,
    VcpuRecord,
    VmConfig,
    X86VcpuRecord,
)

__all__ = [
    "MAJOR",
    "MINOR",
    "NEED_DATA",
    "ComponentRecord",
    "DeviceChunk",
    "DevicePhase",
    "End",
    "KvmClockRecord",
    "PassEnd",
    "RamPages",
    "RamScatter",
    "RamZero",
    "Record",
    "RecordType",
    "StreamDecoder",
    "StreamEncoder",
    "VcpuRecord",
    "VmConfig",
    "X86VcpuRecord",
]
