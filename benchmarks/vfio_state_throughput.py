"""VFIO device-state throughput: 256 MiB of STOP_COPY state, saved and resumed.

Moves a pds-like device's state (one blob) from a saving stream into a resuming device
through 1 MiB reads and writes, and compares, in the same run, with

* ``memcpy``: one plain copy of the same number of bytes (numpy ``copyto``);
* ``chunked``: the same 1 MiB buffer pipeline without the model (read a chunk into a
  buffer, copy it into the destination): the floor of any stream-based transfer;
* ``ram_codec`` vs ``device_codec``: the same volume through the migration stream codec,
  in process (no socket): 1 MiB RAM_PAGES records decoded into guest RAM, against the
  device's stream framed as 1 MiB DEVICE chunks, decoded and written into the resuming
  device (SAVE and RESTORE included) -- the device-vs-RAM ratio of the migration path.

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
from vmferry.machine.ram import GuestRam
from vmferry.migration.stream import (
    DeviceChunk,
    DevicePhase,
    RamPages,
    StreamDecoder,
    StreamEncoder,
)
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


def _pipe(records: list[object], consume: object) -> None:
    """Encode ``records`` and decode them chunk by chunk, handing each to ``consume``."""
    enc, dec = StreamEncoder(), StreamDecoder()
    dec.feed(enc.header())
    for rec in records:
        for part in enc.encode(rec):  # type: ignore[arg-type]
            dec.feed(part)
        for event in dec.events():
            consume(event)  # type: ignore[operator]


def ram_codec(ram_src: GuestRam, ram_dst: GuestRam) -> float:
    per = CHUNK // ram_src.page_size
    t0 = time.perf_counter()
    records: list[object] = []

    def load(rec: object) -> None:
        if isinstance(rec, RamPages):
            first = rec.gpa // rec.page_size
            data = np.frombuffer(rec.data, dtype=np.uint8).reshape(-1, rec.page_size)
            ram_dst.write_pages(first, data)

    for first in range(0, ram_src.npages, per):
        records = [RamPages(first * ram_src.page_size, ram_src.page_size,
                            ram_src.view(first * ram_src.page_size, CHUNK))]  # fmt: skip
        _pipe(records, load)
    return time.perf_counter() - t0


def device_codec(model: ModelTransfer) -> float:
    src, dst = model.src, model.dst
    src.set_state(DeviceState.RUNNING)
    src.run(10)
    src.set_state(DeviceState.STOP)
    resuming = dst.set_state(DeviceState.RESUMING)
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    saving = src.set_state(DeviceState.STOP_COPY)
    seq = 0

    def load(rec: object) -> None:
        if isinstance(rec, DeviceChunk):
            resuming.write_all(rec.data)  # type: ignore[union-attr]

    while n := saving.readinto(buf):  # type: ignore[union-attr]
        _pipe([DeviceChunk(src.name, DevicePhase.STOP_COPY, seq, memoryview(buf)[:n])], load)
        seq += 1
    dst.set_state(DeviceState.STOP)
    elapsed = time.perf_counter() - t0
    model.equal = model.equal and src.state_digest() == dst.state_digest()
    saving.close()  # type: ignore[union-attr]
    resuming.close()  # type: ignore[union-attr]
    return elapsed


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
    ram_src, ram_dst = GuestRam(size), GuestRam(size)
    ram_src.bytes[:] = a
    ram_dst.bytes.fill(1)
    model.once()  # first round: the drivers allocate their buffers
    rounds = []
    for _ in range(args.repeat):  # interleaved, so CPU contention hits all alike
        rounds.append((*model.once(), memcpy(a, b), chunked(a, b),
                       ram_codec(ram_src, ram_dst), device_codec(model)))  # fmt: skip
    best = [min(col) for col in zip(*rounds, strict=True)]
    stream_s, total_s, base_memcpy, base_chunked, ram_s, dev_s = best
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
        "ram_codec_MBps": mbps(ram_s),
        "device_codec_MBps": mbps(dev_s),
        "device_vs_ram_codec": round(ram_s / dev_s, 3),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
