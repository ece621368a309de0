"""What the channel's DATA framing costs on the migration data path, in one process.

A real migration stream (a VM of ``--memory-mib`` random RAM, encoded once by a
``SourceSession``) crosses a loopback TCP connection twice per round, alternated:

* ``raw``: the stream bytes as they are (``send_buffers`` of the session's views) and
  ``recv_into`` the stream decoder's buffer -- the data path before the channel;
* ``channel``: the same buffers as the host daemon sends them now -- DATA frames of a
  source ``Connection`` (``Channel.send_stream``, header + payload views in one
  ``sendmsg``), then STREAM_END -- received by a destination ``Connection``
  (``Channel.receive_stream``: ``direct_payload`` lets the payload go straight into the
  decoder's buffer).

Both decode every record.  Prints JSON: GB/s of each round, the medians and
``ratio = channel / raw`` (1.0: the framing costs nothing; machine load hits both alike).

    python benchmarks/channel_framing.py [--memory-mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from typing import Any

from vmferry.host.clocks import MonotonicClock
from vmferry.host.transport import Channel, SocketLink, send_buffers
from vmferry.machine.vm import create_vm
from vmferry.migration.channel import Connection, Hello, Role, StreamEnd, Welcome
from vmferry.migration.source import MigrationParams, SourceSession
from vmferry.migration.stream import StreamDecoder
from vmferry.migration.stream.records import Buffer

MIB = 1024 * 1024


def stream(memory_mib: int) -> list[list[bytes]]:
    """One offline migration's batches, copied out (the session reuses its buffers)."""
    vm = create_vm({"name": "bench", "memory_mib": memory_mib, "fill": "random"})
    session = SourceSession(vm, MigrationParams(offline=True), MonotonicClock())
    out: list[list[bytes]] = []
    bufs = session.start()
    while bufs:
        out.append([bytes(b) for b in bufs])
        bufs = session.next_buffers()
    vm.close()
    return out


def _pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname()[:2])
    b, _ = listener.accept()
    listener.close()
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def _raw(batches: list[list[bytes]]) -> float:
    a, b = _pair()

    def send() -> None:
        for batch in batches:
            send_buffers(a, batch)
        a.close()

    t = threading.Thread(target=send)
    t0 = time.perf_counter()
    t.start()
    decoder = StreamDecoder()
    while not decoder.done:
        view = decoder.writable()
        n = b.recv_into(view)
        decoder.wrote(n)
        if n == 0:
            decoder.eof()
        for _ in decoder.events():
            pass
    t.join()
    b.close()
    return time.perf_counter() - t0


def _channel(batches: list[list[bytes]]) -> float:
    a, b = _pair()
    src = Channel(SocketLink(a), Connection(Role.SOURCE))
    dst = Channel(SocketLink(b), Connection(Role.DESTINATION))

    def send() -> None:
        src.send(Hello("t", (1, 0), "running", "A"))
        assert isinstance(src.next_event(), Welcome)
        for batch in batches:
            bufs: list[Buffer] = list(batch)
            src.send_stream(bufs)
        src.send(StreamEnd())

    def on_stall(seconds: float) -> None:
        if seconds > 30:
            raise TimeoutError("stalled")

    t = threading.Thread(target=send)
    t0 = time.perf_counter()
    t.start()
    assert isinstance(dst.next_event(), Hello)
    dst.send(Welcome("B"))
    decoder = StreamDecoder()
    end = dst.receive_stream(decoder, lambda rec: None, on_stall)
    assert isinstance(end, StreamEnd) and decoder.done
    t.join()
    a.close()
    b.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    batches = stream(args.memory_mib)
    nbytes = sum(len(b) for batch in batches for b in batch)
    runs: dict[str, list[float]] = {"raw": [], "channel": []}
    for _ in range(args.rounds):
        for name, fn in (("raw", _raw), ("channel", _channel)):
            runs[name].append(round(nbytes / fn(batches) / 1e9, 3))
    out: dict[str, Any] = {"stream_bytes": nbytes, "batches": len(batches),
                           "gb_per_s": runs,
                           "median_gb_per_s": {k: statistics.median(v) for k, v in runs.items()}}
    out["ratio"] = round(out["median_gb_per_s"]["channel"] / out["median_gb_per_s"]["raw"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
