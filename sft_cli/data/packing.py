"""Packing algorithms: pure functions from example lengths to rows (bins), and the
row layout that keeps packed examples independent.

A packed row of three examples A (3 tokens), B (2) and C (3), max_seq_len 8:

    input_ids     a0 a1 a2 b0 b1 c0 c1 c2
    position_ids   0  1  2  0  1  0  1  2     restart per example: RoPE sees each alone,
                                              and transformers derives the block-diagonal mask
    seq_lens      [3, 2, 3]
    labels        -100 .. .. -100 .. -100 .. ..   the first token of every example is never a
                                              target: nothing of its own precedes it

    attention (1 = may attend)   a0 a1 a2 b0 b1 c0 c1 c2
                             a2   1  1  1  .  .  .  .  .
                             b1   .  .  .  1  1  .  .  .
                             c2   .  .  .  .  .  1  1  1

    >>> bfd_bins([5, 3, 4, 2, 6], capacity=8)
    [[4, 3], [0, 1], [2]]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sft_cli.data import IGNORE_INDEX


@dataclass(frozen=True)
class Plan:
    """Packed rows as flat arrays of pieces in row order, so millions of them cost a few arrays,
    not millions of Python tuples: row r holds pieces row_offsets[r]:row_offsets[r + 1], and piece p
    is tokens start[p]:stop[p] of example[p]. Iterating gives the rows by hand:

    >>> list(wrapped_rows([3, 4, 2], capacity=4))
    [[(0, 0, 3), (1, 0, 1)], [(1, 1, 4), (2, 0, 1)], [(2, 1, 2)]]
    """

    example: np.ndarray  # int64, one per piece
    start: np.ndarray  # int64
    stop: np.ndarray  # int64
    row_offsets: np.ndarray  # int64, one per row + 1

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        pieces = list(zip(self.example.tolist(), self.start.tolist(), self.stop.tolist()))
        bounds = self.row_offsets.tolist()
        return (pieces[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))


def bfd_bins(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the open bin it fills most tightly.

    Open bins are bucketed by remaining capacity, and one Python int holds a bit per non-empty
    bucket, so "the tightest bin that fits" is the lowest set bit at or above the length: a shift
    and a bit trick per example (~1M examples in 1.5 s), no scan.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths > capacity).any() or (lengths <= 0).any():
        raise ValueError(f"every length must be in [1, {capacity}]")
    order = np.argsort(-lengths, kind="stable")  # ties keep input order: deterministic
    buckets: list[list[int]] = [[] for _ in range(capacity + 1)]  # remaining capacity -> open bins
    open_rooms = 0  # bit r set: some open bin has exactly r tokens of room
    bins: list[list[int]] = []
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        fitting = open_rooms >> length
        if fitting:
            room = length + (fitting & -fitting).bit_length() - 1  # lowest set bit: the tightest fit
            bucket = buckets[room]
            bin_id = bucket.pop()
            if not bucket:
                open_rooms ^= 1 << room
            bins[bin_id].append(index)
            remaining = room - length
        else:
            bin_id = len(bins)
            bins.append([index])
            remaining = capacity - length
        if remaining > 0:  # a full bin never takes anything again
            if not buckets[remaining]:
                open_rooms |= 1 << remaining
            buckets[remaining].append(bin_id)
    return bins


def wrapped_rows(lengths, capacity: int) -> Plan:
    """Concatenate and cut every `capacity` tokens.

    For comparison only: it splits examples across rows. Pieces lie between consecutive cuts,
    the cuts being every example boundary and every multiple of `capacity`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    cuts = np.union1d(np.concatenate([[0], ends]), np.arange(0, total, capacity))
    begin, end = cuts[:-1], cuts[1:]
    example = np.searchsorted(ends, begin, side="right")  # empty examples own no piece
    example_begin = ends[example] - lengths[example]
    row_offsets = np.searchsorted(begin // capacity, np.arange(-(-total // capacity) + 1))
    return Plan(example, begin - example_begin, end - example_begin, row_offsets)


def position_ids(seq_lens, dtype: type = np.int64) -> np.ndarray:
    """0..len-1 for each example, concatenated. [3, 2] -> [0 1 2 0 1]."""
    seq_lens = np.asarray(seq_lens, dtype=dtype)
    starts = np.repeat(np.cumsum(seq_lens, dtype=dtype) - seq_lens, seq_lens)
    return np.arange(int(seq_lens.sum()), dtype=dtype) - starts


def mask_example_starts(labels: np.ndarray, seq_lens) -> np.ndarray:
    """The one place packing boundaries are enforced: after the one-token shift, the last token of
    an example would be trained to predict the first token of the next one. Its label goes."""
    labels = np.array(labels, copy=True)
    starts = np.cumsum(seq_lens) - np.asarray(seq_lens)
    labels[starts] = IGNORE_INDEX
    return labels
