"""Page runs for the migration sender: sorted page indexes cut into runs, runs cut
into zero and live pieces, and the batches the sender hands to the host."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt

from vmferry.migration.stream.records import Buffer

#: bytes the sender collects before it hands a batch to the host
BATCH_BYTES = 4 * 1024 * 1024


def page_runs(
    index: npt.NDArray[np.int64], max_len: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Split sorted page indexes into (start, length) runs of at most ``max_len``."""
    if index.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = index[np.concatenate(([0], breaks))]
    lengths = np.diff(np.concatenate((np.concatenate(([0], breaks)), [index.size])))
    pieces = (lengths + max_len - 1) // max_len
    run_of_piece = np.repeat(np.arange(starts.size), pieces)
    first_piece = np.cumsum(pieces) - pieces
    k = np.arange(run_of_piece.size) - first_piece[run_of_piece]
    p_start = starts[run_of_piece] + k * max_len
    p_len = np.minimum(max_len, lengths[run_of_piece] - k * max_len)
    return p_start.astype(np.int64), p_len.astype(np.int64)


class Batch:
    """Buffers collected until about :data:`BATCH_BYTES` are ready to send."""

    def __init__(self, parts: list[Buffer] | None = None) -> None:
        self.parts: list[Buffer] = parts if parts is not None else []
        self.size = sum(len(p) for p in self.parts)

    def add(self, parts: list[Buffer]) -> bool:
        """Append one record's buffers; True once the batch is full."""
        self.parts += parts
        self.size += sum(len(p) for p in parts)
        return self.size >= BATCH_BYTES

    def take(self) -> list[Buffer]:
        out, self.parts, self.size = self.parts, [], 0
        return out


def expand(
    starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64], size: int
) -> npt.NDArray[np.bool_]:
    """A mask of ``size`` pages with the runs (start, length) set."""
    delta = np.zeros(size + 1, dtype=np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + lengths, -1)
    return np.cumsum(delta[:-1]) > 0


def split(zero: npt.NDArray[np.bool_], first: int) -> list[tuple[bool, int, int]]:
    """Cut a run into maximal (is_zero, start, count) pieces."""
    if zero.all():
        return [(True, first, zero.size)]
    if not zero.any():
        return [(False, first, zero.size)]
    edges = np.flatnonzero(np.diff(zero.view(np.int8))) + 1
    bounds = np.concatenate(([0], edges, [zero.size])).tolist()
    return [(bool(zero[a]), first + a, b - a) for a, b in itertools.pairwise(bounds)]
