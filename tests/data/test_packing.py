"""Packing by hand: BFD bins, wrapped rows, position ids, boundary labels, the collator."""

import numpy as np
import pytest
import torch

from sft_cli.data.collate import Collator, length_grouped_batches
from sft_cli.data.packing import IGNORE_INDEX, bfd_bins, mask_example_starts, position_ids, wrapped_rows
from sft_cli.pack import plan_rows


def test_bfd_by_hand():
    # sorted: 6(#4) 5(#0) 4(#2) 3(#1) 2(#3); 3 fits the bin with 3 left (#0's), 2 the one with 2 left (#4's)
    assert bfd_bins([5, 3, 4, 2, 6], capacity=8) == [[4, 3], [0, 1], [2]]
    # best fit, not first fit: 3 goes to the bin with 3 left, not the first with room (5 left)
    assert bfd_bins([5, 7, 3], capacity=10) == [[1, 2], [0]]
    assert bfd_bins([4, 4, 4, 4], capacity=8) == [[0, 1], [2, 3]]
    assert bfd_bins([8, 1], capacity=8) == [[0], [1]]
    with pytest.raises(ValueError):
        bfd_bins([9], capacity=8)


def test_bfd_never_overflows_and_uses_every_example_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=2000)
    bins = bfd_bins(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(2000))
    assert max(lengths[b].sum() for b in bins) <= 256
    assert lengths.sum() / (len(bins) * 256) > 0.97


def test_wrapped_cuts_examples_across_rows():
    assert list(wrapped_rows([3, 4, 2], capacity=4)) == [[(0, 0, 3), (1, 0, 1)], [(1, 1, 4), (2, 0, 1)], [(2, 1, 2)]]
    assert list(wrapped_rows([], capacity=4)) == [] and list(wrapped_rows([0, 0], capacity=4)) == []


def test_wrapped_is_the_concatenation_cut_every_capacity_tokens():
    rng = np.random.default_rng(2)
    for _ in range(50):
        lengths, capacity = rng.integers(0, 12, size=int(rng.integers(1, 30))), int(rng.integers(1, 9))
        tokens = [(example, i) for example, n in enumerate(lengths.tolist()) for i in range(n)]
        expected = []
        for lo in range(0, len(tokens), capacity):
            row = []
            for example, i in tokens[lo:lo + capacity]:
                if row and row[-1][0] == example:
                    row[-1] = (example, row[-1][1], i + 1)
                else:
                    row.append((example, i, i + 1))
            expected.append(row)
        assert list(wrapped_rows(lengths, capacity)) == expected


def test_position_ids_and_boundary_labels_by_hand():
    assert position_ids([3, 2, 1]).tolist() == [0, 1, 2, 0, 1, 0]
    labels = np.array([10, 11, 12, 20, 21, 30])
    assert mask_example_starts(labels, [3, 2, 1]).tolist() == [-100, 11, 12, -100, 21, -100]


def test_plan_rows_is_deterministic_and_shuffles_whole_bins():
    lengths = np.random.default_rng(1).integers(1, 50, size=300)
    a, b = list(plan_rows(lengths, "bfd", 64, seed=3)), list(plan_rows(lengths, "bfd", 64, seed=3))
    assert a == b and a != list(plan_rows(lengths, "bfd", 64, seed=4))
    assert sorted(map(tuple, a)) == sorted(map(tuple, plan_rows(lengths, "bfd", 64, seed=4)))
    assert sorted([i for i, _, _ in row] for row in a) == sorted(bfd_bins(lengths, 64))
    assert all(stop == lengths[i] and start == 0 for row in a for i, start, stop in row)
    assert list(plan_rows([5, 2], "none", 64, seed=0)) == [[(0, 0, 5)], [(1, 0, 2)]]


def test_collator_pads_as_its_own_block():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0], "seq_lens": [2, 1]},
            {"input_ids": [8], "labels": [-100], "position_ids": [0], "seq_lens": [1]}]
    batch = Collator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert "attention_mask" not in batch
    flat = Collator(pad_id=0, flat=True)(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8]] and flat["position_ids"].tolist() == [[0, 1, 0, 0]]
    assert isinstance(flat["input_ids"], torch.Tensor)


def test_length_grouped_batches_cover_everything_once():
    lengths = np.random.default_rng(0).integers(1, 1000, size=1000)
    batches = length_grouped_batches(lengths, batch_size=8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 100  # random batches would spread ~750
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=0)
