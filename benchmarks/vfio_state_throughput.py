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


def model_transfer(mib: int, repeat: int) -> tuple[float, float, bool]:
    """Best (seconds to read+write, seconds incl. SAVE and RESTORE), digests equal.

    The same two devices migrate ``repeat`` times, so the drivers' transfer buffers are
    allocated (and faulted in) once, as a long-running host would have them.
    """
    memory = ByteMemory(1 << 20)
    src, dst = _device(mib, memory), _device(mib, memory)
    image = src.driver.image  # type: ignore[union-attr]
    image[:] = np.random.default_rng(1).integers(0, 256, image.size, dtype=np.uint8)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    best_stream = best_total = float("inf")
    equal = True
    for _ in range(repeat):
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
        equal = equal and src.state_digest() == dst.state_digest()
        saving.close()  # type: ignore[union-attr]
        resuming.close()  # type: ignore[union-attr]
        best_stream, best_total = min(best_stream, t2 - t1), min(best_total, t3 - t0)
    return best_stream, best_total, equal


def memcpy(mib: int) -> float:
    a = np.random.default_rng(2).integers(0, 256, mib << 20, dtype=np.uint8)
    b = np.zeros_like(a)
    b.fill(1)  # fault the pages in before timing
    t0 = time.perf_counter()
    np.copyto(b, a)
    return time.perf_counter() - t0


def chunked(mib: int) -> float:
    a = np.random.default_rng(3).integers(0, 256, mib << 20, dtype=np.uint8)
    b = np.zeros_like(a)
    b.fill(1)
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
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.mib << 20
    stream_s, total_s, equal = model_transfer(args.mib, args.repeat)
    base_memcpy = min(memcpy(args.mib) for _ in range(args.repeat))
    base_chunked = min(chunked(args.mib) for _ in range(args.repeat))
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
