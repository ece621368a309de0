"""Device-state chunks and capabilities: round trips and strict decoding."""

from __future__ import annotations

import pytest

from vmferry.errors import MalformedRecord, StreamDecodeError
from vmferry.hw.vfio.persist import (
    ChunkKind,
    ChunkSequencer,
    DeviceStateChunk,
    decode_capability,
    decode_chunk,
    encode_capability,
    encode_chunk,
)
from vmferry.testing.vfio import make


def test_chunk_round_trip() -> None:
    chunk = DeviceStateChunk("nic0", 3, ChunkKind.STOP_COPY, b"\x00\x01payload")
    assert decode_chunk(encode_chunk(chunk)) == chunk


@pytest.mark.parametrize("kind", ["mlx5", "pds", "hisi_acc"])
def test_capability_round_trip(kind: str) -> None:
    cap = make(kind).capability()
    assert decode_capability(encode_capability(cap)) == cap


def test_malformed_chunks_are_typed_errors() -> None:
    good = encode_chunk(DeviceStateChunk("nic0", 0, ChunkKind.CAPABILITY, b"abc"))
    bad = [good[:10], b"XXXX" + good[4:], good[:4] + b"\x09" + good[5:],
           good[:5] + b"\x63" + good[6:], good + b"!", good[:-1]]  # fmt: skip
    for data in bad:
        with pytest.raises(StreamDecodeError):
            decode_chunk(data)
    cap = encode_capability(make().capability())
    for data in (cap[:-1], cap + b"!", b"", b"\xff" * 8 + cap[8:]):
        with pytest.raises(StreamDecodeError):
            decode_capability(data)


def test_sequencer_enforces_order() -> None:
    seq = ChunkSequencer()
    seq.accept(DeviceStateChunk("a", 0, ChunkKind.CAPABILITY, b"c"))
    seq.accept(DeviceStateChunk("b", 0, ChunkKind.CAPABILITY, b"c"))
    seq.accept(DeviceStateChunk("a", 1, ChunkKind.PRECOPY, b"x"))
    with pytest.raises(MalformedRecord):
        seq.accept(DeviceStateChunk("a", 3, ChunkKind.STOP_COPY, b"x"))
    assert seq.next_seq == {"a": 2, "b": 1}
    seq.accept(DeviceStateChunk("a", 2, ChunkKind.END))
    with pytest.raises(MalformedRecord):
        seq.accept(DeviceStateChunk("a", 3, ChunkKind.STOP_COPY, b"x"))
    with pytest.raises(MalformedRecord):
        ChunkSequencer().accept(DeviceStateChunk("c", 0, ChunkKind.PRECOPY, b"x"))
