import numpy as np

from sft_cli.data.mix import mix_counts, sample, split_indices


def test_split_is_deterministic_disjoint_and_complete():
    idx = np.arange(100, 200)
    train, held = split_indices(idx, 0.1, seed=7, salt=0)
    again = split_indices(idx, 0.1, seed=7, salt=0)
    assert len(held) == 10 and len(train) == 90
    assert np.array_equal(train, again[0]) and np.array_equal(held, again[1])
    assert sorted(np.concatenate([train, held]).tolist()) == idx.tolist()
    assert not np.array_equal(held, split_indices(idx, 0.1, seed=8, salt=0)[1])


def test_split_keeps_one_of_each_when_tiny():
    train, held = split_indices(np.arange(2), 0.01, seed=0, salt=0)
    assert len(train) == 1 and len(held) == 1
    train, held = split_indices(np.arange(1), 0.5, seed=0, salt=0)
    assert len(train) == 1 and len(held) == 0


def test_mix_counts_follow_weights_and_keep_total():
    assert mix_counts({"chat": 900, "text": 900}, {"chat": 0.9, "text": 0.1}) == {"chat": 1620, "text": 180}
    assert mix_counts({"a": 10, "b": 30}, {"a": 1, "b": 1}) == {"a": 20, "b": 20}


def test_sample_repeats_whole_copies_then_subsets():
    idx = np.array([5, 6, 7])
    picked = sample(idx, 7, seed=0, salt=0)
    assert len(picked) == 7
    assert np.bincount(picked).tolist()[5:] in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    assert np.array_equal(sample(idx, 2, seed=0, salt=0), sample(idx, 2, seed=0, salt=0))
    assert len(set(sample(idx, 2, seed=0, salt=0).tolist())) == 2
