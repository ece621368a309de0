"""VFIO device-state throughput: 256 MiB of STOP_COPY state, saved and resumed.

Moves a pds-like device's state (one blob) from a saving stream into a resuming device
through 1 MiB reads and writes, and compares, in the same run, with

* ``memcpy``: one plain copy of the same number of bytes (numpy ``copyto``);
* ``chunked``: the same 1 MiB buffer pipeline without the model (read a chunk into a
  buffer, copy it into the destination): the floor of any stream-based transfer.

The model path also pays for the SAVE (snapshot + checksum) and the RESTORE validation
(checksum + load), which the baselines do not.  Prints JSON.

    PYTHONPATH=src python benchmarks/vfio_state_throughput.py [--mib 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from vmferry.hw.vfio import DeviceState, create_device
from vmferry.testing.memory import ByteMemory

CHUNK = 1 << 20


def _device(mib: int, memory: ByteMemory):  # type: ignore[no-untyped-def]
    spec = {"id": "bench0", "driver": "pds", "state_mib": mib, "dma_region": [0, 1 << 16],
            "seed": 1}  # fmt: skip
    return create_device(spec, memory)


class ModelTransfer:
    """Two devices migrating the same 256 MiB state again and again.

    Their transfer buffers are allocated (and faulted in) by the first round, as on a
    long-running host; ``once`` times one round.
    """

    def __init__(self, mib: int) -> None:
        memory = ByteMemory(1 << 20)
        self.src, self.dst = _device(mib, memory), _device(mib, memory)
        image = self.src.driver.image  # type: ignore[union-attr]
        image[:] = np.random.default_rng(1).integers(0, 256, image.size, dtype=np.uint8)
        self.buf = bytearray(CHUNK)
        self.equal = True

    def once(self) -> tuple[float, float]:
        """(seconds to read+write the stream, seconds incl. SAVE and RESTORE)."""
        src, dst, buf = self.src, self.dst, self.buf
        view = memoryview(buf)
        src.set_state(DeviceState.RUNNING)
        src.run(100)
        src.set_state(DeviceState.STOP)
        resuming = dst.set_state(DeviceState.RESUMING)
        t0 = time.perf_counter()
        saving = src.set_state(DeviceState.STOP_COPY)  # the SAVE
        t1 = time.perf_counter()
        while n := saving.readinto(buf):  # type: ignore[union-attr]
            resuming.write_all(view[:n])  # type: ignore[union-attr]
        t2 = time.perf_counter()
        dst.set_state(DeviceState.STOP)  # RESTORE: validate + load
        t3 = time.perf_counter()
        self.equal = self.equal and src.state_digest() == dst.state_digest()
        saving.close()  # type: ignore[union-attr]
        resuming.close()  # type: ignore[union-attr]
        return t2 - t1, t3 - t0


def buffers(mib: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.random.default_rng(2).integers(0, 256, mib << 20, dtype=np.uint8)
    b = np.zeros_like(a)
    b.fill(1)  # fault the pages in before timing
    return a, b


def memcpy(a: np.ndarray, b: np.ndarray) -> float:
    t0 = time.perf_counter()
    np.copyto(b, a)
    return time.perf_counter() - t0


def chunked(a: np.ndarray, b: np.ndarray) -> float:
    buf = np.zeros(CHUNK, dtype=np.uint8)
    t0 = time.perf_counter()
    for off in range(0, a.size, CHUNK):
        n = min(CHUNK, a.size - off)
        buf[:n] = a[off : off + n]
        b[off : off + n] = buf[:n]
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = args.mib << 20
    model = ModelTransfer(args.mib)
    a, b = buffers(args.mib)
    model.once()  # first round: the drivers allocate their buffers
    rounds = []
    for _ in range(args.repeat):  # interleaved, so CPU contention hits all three alike
        rounds.append((*model.once(), memcpy(a, b), chunked(a, b)))
    stream_s, total_s, base_memcpy, base_chunked = (min(col) for col in zip(*rounds, strict=True))
    equal = model.equal
    mbps = lambda s: round(size / s / 1e6, 1)  # noqa: E731
    print(json.dumps({
        "state_bytes": size,
        "chunk_bytes": CHUNK,
        "digest_equal": equal,
        "stream_MBps": mbps(stream_s),
        "end_to_end_MBps": mbps(total_s),
        "memcpy_MBps": mbps(base_memcpy),
        "chunked_copy_MBps": mbps(base_chunked),
        "stream_vs_memcpy": round(base_memcpy / stream_s, 3),
        "stream_vs_chunked_copy": round(base_chunked / stream_s, 3),
        "end_to_end_vs_memcpy": round(base_memcpy / total_s, 3),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
