"""StepPlan (which rows every rank reads at every step) and RowCounts (a step's token and target
counts without touching a device), checked by hand and against the Collator."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest

from sft_cli.data.collate import Collator
from sft_cli.data.packing import IGNORE_INDEX, mask_example_starts, position_ids
from sft_cli.data.sampler import RowCounts, StepPlan

X = IGNORE_INDEX


def plan(num_rows=100, micro_batch_size=4, grad_accum=2, world_size=1, seed=0, lengths=None) -> StepPlan:
    return StepPlan(num_rows=num_rows, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                    world_size=world_size, seed=seed, lengths=lengths)


def epoch_rows(p: StepPlan, epoch: int) -> list[int]:
    """Every row read in one epoch, over all its steps and ranks, in reading order."""
    first = epoch * p.steps_per_epoch
    return [row for step in range(first, first + p.steps_per_epoch) for rank in range(p.world_size)
            for batch in p.micro_batches(step, rank) for row in batch]


# -- StepPlan ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_rows, micro, accum, world, steps", [
    (100, 4, 2, 1, 12),   # 25 micro-batches, 2 a step: 12 steps, 1 micro-batch left over
    (101, 4, 2, 1, 13),   # 26 micro-batches (the last holds 1 row): 13 steps, nothing left over
    (100, 4, 2, 2, 6),    # 4 micro-batches a step (2 ranks x 2)
    (100, 4, 1, 2, 12),
    (7, 4, 2, 1, 1),      # a short last micro-batch still counts
    (7, 4, 2, 2, 0),      # too few rows for one step
])
def test_steps_per_epoch(num_rows, micro, accum, world, steps):
    p = plan(num_rows, micro, accum, world)
    assert p.micro_batches_per_step == accum * world
    assert p.steps_per_epoch == steps


def test_total_steps_from_max_steps_or_epochs():
    p = plan()  # 12 steps an epoch
    assert p.total_steps(epochs=3, max_steps=5) == 5  # max_steps wins
    assert p.total_steps(epochs=1.5, max_steps=-1) == 18
    assert p.total_steps(epochs=0.01, max_steps=0) == 1  # never zero steps


@pytest.mark.parametrize("num_rows, micro, accum, world", [(100, 4, 2, 1), (101, 4, 2, 1), (100, 3, 2, 2),
                                                           (64, 4, 4, 4)])
def test_every_row_at_most_once_per_epoch(num_rows, micro, accum, world):
    p = plan(num_rows, micro, accum, world)
    for epoch in (0, 1):
        rows = epoch_rows(p, epoch)
        assert len(rows) == len(set(rows))  # at most once
        assert set(rows) <= set(range(num_rows))
        # Only the micro-batches left over after the last whole step are skipped.
        left_over = -(-num_rows // micro) - p.steps_per_epoch * p.micro_batches_per_step
        assert left_over < p.micro_batches_per_step
        assert num_rows - len(rows) <= left_over * micro


def test_ranks_and_grad_accum_partition_a_steps_micro_batches():
    p = plan(num_rows=100, micro_batch_size=3, grad_accum=2, world_size=3)
    for step in range(2 * p.steps_per_epoch):  # two epochs
        per_rank = [p.micro_batches(step, rank) for rank in range(p.world_size)]
        assert all(len(batches) == p.grad_accum for batches in per_rank)
        everyone = [row for batches in per_rank for batch in batches for row in batch]
        assert len(everyone) == len(set(everyone))  # no row on two ranks or in two micro-batches
        assert sorted(everyone) == sorted(p.step_rows(step))  # step_rows: exactly the step's rows


def test_one_process_accum_2_reads_what_two_processes_accum_1_read():
    single, pair = plan(grad_accum=2, world_size=1), plan(grad_accum=1, world_size=2)
    assert single.steps_per_epoch == pair.steps_per_epoch
    for step in range(2 * single.steps_per_epoch):
        # Micro-batch j of the step goes to rank j in the pair and to accumulation j in one process.
        assert single.micro_batches(step, 0) == [pair.micro_batches(step, 0)[0], pair.micro_batches(step, 1)[0]]
        assert single.step_rows(step) == pair.step_rows(step)


def test_step_rows_in_micro_batch_order():
    p = plan(num_rows=40, micro_batch_size=2, grad_accum=2, world_size=2)
    batches = p.epoch_batches(0)
    # Step 1 takes micro-batches 4..7 of the epoch: rank 0 gets 4 and 6, rank 1 gets 5 and 7.
    assert p.micro_batches(1, 0) == [batches[4], batches[6]]
    assert p.micro_batches(1, 1) == [batches[5], batches[7]]
    assert p.step_rows(1) == batches[4] + batches[5] + batches[6] + batches[7]


def test_the_same_seed_and_epoch_give_the_same_rows_in_a_fresh_plan():
    """A pure function of (seed, epoch, step): a resumed run rebuilds the plan and reads the same rows."""
    a, b = plan(seed=3), plan(seed=3)
    steps = [0, 5, a.steps_per_epoch + 2, 3 * a.steps_per_epoch + 1]
    # b asks in the other order: its cache of recent epochs must not change what a step reads.
    assert [b.micro_batches(s, 0) for s in reversed(steps)][::-1] == [a.micro_batches(s, 0) for s in steps]
    assert plan(seed=4).epoch_batches(0) != a.epoch_batches(0)
    # Unpacked rows, batched by length: deterministic too.
    lengths = [int(n) for n in np.random.default_rng(0).integers(1, 300, size=100)]
    assert plan(seed=3, lengths=lengths).epoch_batches(1) == plan(seed=3, lengths=lengths).epoch_batches(1)


@pytest.mark.parametrize("lengths", [None, [int(n) for n in np.random.default_rng(1).integers(1, 300, size=100)]],
                         ids=["packed", "length-grouped"])
def test_each_epoch_is_reshuffled(lengths):
    p = plan(lengths=lengths)
    first, second = p.epoch_batches(0), p.epoch_batches(1)
    assert first != second
    if lengths is None:  # new batches, not just a new order (length-grouped rows fitting in one
        # mega-batch are sorted into the same batches every epoch: only their order changes)
        assert sorted(map(sorted, first)) != sorted(map(sorted, second))
    assert sorted(row for b in first for row in b) == sorted(row for b in second for row in b) == list(range(100))
    # Steps past the first epoch read the second epoch's batches.
    assert p.micro_batches(p.steps_per_epoch, 0) == second[:2]
    assert p.position(p.steps_per_epoch + 3) == (1, 3)


def test_length_grouped_epochs_read_each_row_at_most_once():
    lengths = [int(n) for n in np.random.default_rng(2).integers(1, 300, size=90)]
    p = plan(num_rows=90, micro_batch_size=4, grad_accum=2, world_size=2, lengths=lengths)
    for epoch in (0, 1):
        rows = epoch_rows(p, epoch)
        assert len(rows) == len(set(rows)) and set(rows) <= set(range(90))
    assert Counter(len(b) for b in p.epoch_batches(0)) == Counter({4: 22, 2: 1})  # 90 = 22 x 4 + 2


# -- RowCounts --------------------------------------------------------------------------------------

# Packed rows counted by hand: tokens, targets (labels after the one-token shift: the first label of a
# row is never a target), sum of squared example lengths.
HAND = [
    # labels                     seq_lens     tokens targets attention
    ([X, 5, 6, X, 7],            [3, 2],      5,     3,      9 + 4),
    ([8, 9, X],                  [3],         3,     1,      9),      # 8: first label, not a target
    ([X, X],                     [2],         2,     0,      4),
    ([1, 2, 3, 4],               [1, 1, 2],   4,     3,      1 + 1 + 4),
    ([X, 3, 3, 3, 3, 3, 3],      [7],         7,     6,      49),
]


def _dataset(rows: list[tuple[list[int], list[int]]]) -> datasets.Dataset:
    """Packed rows as the trainer reads them (input_ids = labels where trained, else token 2)."""
    return datasets.Dataset.from_dict({
        "input_ids": [[t if t != X else 2 for t in labels] for labels, _ in rows],
        "labels": [labels for labels, _ in rows],
        "position_ids": [position_ids(lens).tolist() for _, lens in rows],
        "seq_lens": [lens for _, lens in rows]})


def test_row_counts_by_hand():
    counts = RowCounts.of(_dataset([(labels, lens) for labels, lens, *_ in HAND]))
    assert counts.tokens.tolist() == [h[2] for h in HAND]
    assert counts.targets.tolist() == [h[3] for h in HAND]
    assert counts.attention.tolist() == [h[4] for h in HAND]
    assert counts.total([0, 3]) == (5 + 4, 3 + 3, 13.0 + 6.0)
    assert counts.total([]) == (0, 0, 0.0)


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 8192])
def test_row_counts_follow_a_select_index_mapping(batch_rows):
    """After select() (the eval split, a shuffled subset) the counts are the selected rows', in order,
    however many rows are read at a time."""
    ds = _dataset([(labels, lens) for labels, lens, *_ in HAND])
    order = [4, 0, 3, 1]
    counts = RowCounts.of(ds.select(order), batch_rows=batch_rows)
    assert counts.tokens.tolist() == [HAND[i][2] for i in order]
    assert counts.targets.tolist() == [HAND[i][3] for i in order]
    assert counts.attention.tolist() == [HAND[i][4] for i in order]


def _random_packed_rows(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        lens = rng.integers(1, 20, size=int(rng.integers(1, 5))).tolist()
        ids = rng.integers(3, 100, size=sum(lens))
        labels = np.where(rng.random(len(ids)) < 0.6, ids, X)
        if rng.random() < 0.5:  # half the rows keep a trained first label, as a hand-made dataset may
            labels = mask_example_starts(labels, lens)
        rows.append((labels.tolist(), lens))
    return rows


@pytest.mark.parametrize("batch_rows", [3, 8192])
def test_row_counts_match_the_collators_num_targets(batch_rows):
    """The targets RowCounts promises a step are the ones the loss is normalised by: the Collator's."""
    ds = _dataset(_random_packed_rows(40, seed=0))
    subset = ds.select(np.random.default_rng(1).permutation(40)[:25].tolist())
    counts = RowCounts.of(subset, batch_rows=batch_rows)
    collate = Collator(pad_id=0)
    rows = subset.to_list()
    for i, row in enumerate(rows):
        batch = collate([row])
        assert counts.targets[i] == batch["num_targets"]
        assert counts.tokens[i] == len(row["input_ids"])
        assert counts.attention[i] == sum(n * n for n in row["seq_lens"])
    ids = [0, 5, 7, 24]
    assert counts.total(ids)[1] == collate([rows[i] for i in ids])["num_targets"]  # padded together
