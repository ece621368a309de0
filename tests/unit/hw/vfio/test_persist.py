"""Device capabilities and per-device chunk order: round trips and strict decoding."""

from __future__ import annotations

import pytest

from vmferry.errors import MalformedRecord, StreamDecodeError
from vmferry.hw.vfio.persist import ChunkSequencer, decode_capability, encode_capability
from vmferry.testing.vfio import make


@pytest.mark.parametrize("kind", ["mlx5", "pds", "pds_p2p", "hisi_acc"])
def test_capability_round_trip(kind: str) -> None:
    cap = make(kind).capability()
    assert decode_capability(encode_capability(cap)) == cap


def test_malformed_capability_is_a_typed_error() -> None:
    cap = encode_capability(make().capability())
    for data in (cap[:-1], cap + b"!", b"", b"\xff" * 8 + cap[8:], cap[:18] + b"\xff\xff"):
        with pytest.raises(StreamDecodeError):
            decode_capability(data)


def test_sequencer_enforces_order() -> None:
    seq = ChunkSequencer()
    seq.accept("a", 0)
    seq.accept("b", 0)
    seq.accept("a", 1)
    with pytest.raises(MalformedRecord):
        seq.accept("a", 3)
    assert seq.next_seq == {"a": 2, "b": 1}
    seq.accept("a", 2, last=True)
    with pytest.raises(MalformedRecord):
        seq.accept("a", 3)
    with pytest.raises(MalformedRecord):
        ChunkSequencer().accept("c", 1)
