"""Test helpers for VFIO migration devices (conformance, unit and stateful tests)."""

from __future__ import annotations

import errno
from collections.abc import Callable

from vmferry.hw.vfio import DataStream, DeviceState, VfioError, VfioMigrationDevice, create_device
from vmferry.hw.vfio.states import (
    FEATURE_HEADER,
    FEATURE_MIG_STATE,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_SET,
    Feature,
)
from vmferry.hw.vfio.stream import FdTable
from vmferry.testing.memory import ByteMemory

S = DeviceState
MEM = 1 << 20

SPECS: dict[str, dict[str, object]] = {
    "pds": {"id": "blob0", "driver": "pds", "dma_region": [0, 0x4000], "seed": 7},
    "pds_p2p": {"id": "blob1", "driver": "pds", "p2p": True, "dma_region": [0, 0x4000]},
    "mlx5": {
        "id": "nic0",
        "driver": "mlx5",
        "state_mib": 0.0625,
        "dma_region": [0x4000, 0x4000],
        "seed": 1,
    },
    "hisi_acc": {"id": "acc0", "driver": "hisi_acc", "dma_region": [0x8000, 0x4000], "seed": 2},
}


def make(kind: str = "mlx5", fds: FdTable | None = None, **extra: object) -> VfioMigrationDevice:
    spec = {**SPECS[kind], **extra}
    return create_device(spec, ByteMemory(MEM), fds=fds)


def feature_buf(flags: int, payload: bytes = b"", argsz: int | None = None) -> bytearray:
    size = FEATURE_HEADER.size + len(payload) if argsz is None else argsz
    return bytearray(FEATURE_HEADER.pack(size, flags) + payload)


def raw_set(dev: VfioMigrationDevice, state: int) -> tuple[int, int, int]:
    """SET through the uAPI: (errno or 0, echoed device_state, data_fd)."""
    buf = feature_buf(VFIO_DEVICE_FEATURE_SET | Feature.MIG_DEVICE_STATE,
                      FEATURE_MIG_STATE.pack(state, 0x7777))  # fmt: skip
    try:
        rc = dev.ioctl(VFIO_DEVICE_FEATURE, buf)
    except VfioError as exc:
        rc = exc.errno
    echoed, fd = FEATURE_MIG_STATE.unpack_from(buf, FEATURE_HEADER.size)
    return rc, echoed, fd


def raw_get(dev: VfioMigrationDevice) -> tuple[int, int]:
    buf = feature_buf(VFIO_DEVICE_FEATURE_GET | Feature.MIG_DEVICE_STATE, bytes(8))
    dev.ioctl(VFIO_DEVICE_FEATURE, buf)
    state, fd = FEATURE_MIG_STATE.unpack_from(buf, FEATURE_HEADER.size)
    return state, fd


def expect_errno(err: int, fn: Callable[..., object], *args: object) -> VfioError:
    """Call ``fn(*args)``; it must raise VfioError with ``err``."""
    try:
        fn(*args)
    except VfioError as exc:
        if exc.errno != err:
            raise AssertionError(
                f"{errno.errorcode.get(exc.errno)} raised, {errno.errorcode[err]} expected"
            ) from exc
        return exc
    raise AssertionError(f"{errno.errorcode[err]} expected, call succeeded")


def drain(stream: DataStream, chunk: int = 1 << 20) -> bytes:
    out = bytearray()
    while True:
        try:
            got = stream.read(chunk)
        except VfioError as exc:
            if exc.errno == errno.ENOMSG:
                return bytes(out)
            raise
        if not got:
            return bytes(out)
        out += got


def save_stop_copy(dev: VfioMigrationDevice, ticks: int = 40) -> tuple[bytes, str]:
    """Run, stop, read the whole STOP_COPY stream; returns (stream bytes, digest)."""
    dev.run(ticks)
    stream = dev.set_state(S.STOP_COPY)
    assert stream is not None
    data = drain(stream)
    digest = dev.state_digest()
    dev.set_state(S.STOP)
    stream.close()
    return data, digest


def save_with_precopy(dev: VfioMigrationDevice, ticks: int = 40) -> tuple[bytes, bytes, str]:
    """PRE_COPY session: (pre-copy bytes, stop-copy bytes, digest at switchover)."""
    dev.run(ticks)
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    pre = bytearray(drain(stream))
    dev.run(ticks)
    info = stream.precopy_info()
    pre += stream.read(info.dirty_bytes) if info.dirty_bytes else b""
    dev.run(ticks)
    assert dev.set_state(S.STOP_COPY) is None
    final = drain(stream)
    digest = dev.state_digest()
    dev.set_state(S.STOP)
    stream.close()
    return bytes(pre), final, digest


def resume(dev: VfioMigrationDevice, chunks: list[bytes]) -> None:
    stream = dev.set_state(S.RESUMING)
    assert stream is not None
    try:
        for chunk in chunks:
            stream.write_all(chunk)
    finally:
        stream.close()
    dev.set_state(S.STOP)
