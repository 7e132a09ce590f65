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

import numpy as np

from sft_cli.data import IGNORE_INDEX


def bfd_bins(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the open bin it fills most tightly.

    Open bins are bucketed by remaining capacity, so "the tightest bin that fits" is the first
    non-empty bucket at or above the length: one vectorised argmax per example, O(n * capacity / 8)
    bytes scanned in total, ~1M examples in seconds.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths > capacity).any() or (lengths <= 0).any():
        raise ValueError(f"every length must be in [1, {capacity}]")
    order = np.argsort(-lengths, kind="stable")  # ties keep input order: deterministic
    buckets: list[list[int]] = [[] for _ in range(capacity + 1)]  # remaining capacity -> open bins
    occupied = np.zeros(capacity + 1, dtype=bool)
    bins: list[list[int]] = []
    for index in order.tolist():
        length = int(lengths[index])
        fit = length + int(np.argmax(occupied[length:]))
        if occupied[fit]:
            bin_id = buckets[fit].pop()
            occupied[fit] = bool(buckets[fit])
            bins[bin_id].append(index)
            remaining = fit - length
        else:
            bin_id = len(bins)
            bins.append([index])
            remaining = capacity - length
        if remaining > 0:  # a full bin never takes anything again
            buckets[remaining].append(bin_id)
            occupied[remaining] = True
    return bins


def wrapped_rows(lengths, capacity: int) -> list[list[tuple[int, int, int]]]:
    """Concatenate and cut every `capacity` tokens: rows of (example, start, stop) pieces.

    For comparison only: it splits examples across rows.
    """
    rows: list[list[tuple[int, int, int]]] = [[]]
    room = capacity
    for index, length in enumerate(np.asarray(lengths).tolist()):
        start = 0
        while start < length:
            if room == 0:
                rows.append([])
                room = capacity
            take = min(room, length - start)
            rows[-1].append((index, start, start + take))
            start += take
            room -= take
    return [row for row in rows if row]


def position_ids(seq_lens) -> np.ndarray:
    """0..len-1 for each example, concatenated. [3, 2] -> [0 1 2 0 1]."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    starts = np.repeat(np.cumsum(seq_lens) - seq_lens, seq_lens)
    return np.arange(int(seq_lens.sum()), dtype=np.int64) - starts


def mask_example_starts(labels: np.ndarray, seq_lens) -> np.ndarray:
    """The one place packing boundaries are enforced: after the one-token shift, the last token of
    an example would be trained to predict the first token of the next one. Its label goes."""
    labels = np.array(labels, copy=True)
    starts = np.cumsum(seq_lens) - np.asarray(seq_lens)
    labels[starts] = IGNORE_INDEX
    return labels
