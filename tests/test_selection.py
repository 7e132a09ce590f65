"""selection.py: which scored samples are kept, and the reason for every one that is not."""

from __future__ import annotations

import pytest

from sft_cli.selection import select, shingles, similarity


def sample(content, score=1.0, passed=True, stopped=True, tokens=None, reasoning=None):
    return {"content": content, "score": score, "passed": passed, "stopped": stopped,
            "tokens": tokens if tokens is not None else len(content.split()), "reasoning": reasoning}


def kept(decisions):
    return [i for i, d in enumerate(decisions) if d.kept]


def test_best_keeps_the_highest_score():
    samples = [sample("alpha beta gamma", 0.2), sample("delta epsilon zeta", 0.9), sample("eta theta iota", 0.5)]
    decisions = select(samples, "best")
    assert kept(decisions) == [1]
    assert [d.why for d in decisions] == ["not_selected", "kept", "not_selected"]


def test_ties_break_on_length_then_sample_index():
    samples = [sample("one two three four five six", 1.0), sample("seven eight nine", 1.0),
               sample("ten eleven twelve", 1.0)]
    assert kept(select(samples, "best")) == [1]  # shorter wins; of the two short ones the first
    assert kept(select(samples[::-1], "best")) == [0]  # reversed: "ten eleven twelve" is now the earlier one
    assert select(samples, "best") == select(samples, "best")  # deterministic


def test_unscored_replies_rank_by_sample_index_not_length():
    samples = [sample("a long and detailed distilled answer", None), sample("No.", None)]
    assert kept(select(samples, "best")) == [0]  # scorer none: the first sample, not the shortest


def test_only_passing_replies_are_eligible():
    samples = [sample("wrong answer here", 0.0, passed=False), sample("right answer here", 1.0),
               sample("also right but different words", 1.0)]
    decisions = select(samples, "all_passing")
    assert kept(decisions) == [1, 2]
    assert decisions[0].why == "not_passing"
    assert kept(select([samples[0]], "best")) == []  # a prompt with no passing reply keeps nothing


def test_top_k_keeps_k_best():
    samples = [sample(f"reply number {w} words", s) for w, s in (("a", 0.1), ("b", 0.7), ("c", 0.9), ("d", 0.3))]
    assert kept(select(samples, "top_k", k=2)) == [1, 2]
    assert kept(select(samples, "top_k", k=10)) == [0, 1, 2, 3]


def test_min_score_truncated_and_empty():
    samples = [sample("low score reply", 0.1), sample("cut off reply", 0.9, stopped=False), sample("   ", 0.9),
               sample("good reply", 0.8)]
    decisions = select(samples, "all_passing", min_score=0.5)
    assert [d.why for d in decisions] == ["below_min_score", "truncated", "empty", "kept"]
    assert kept(select(samples, "all_passing", min_score=0.5, keep_truncated=True)) == [1, 3]
    too_long = dict(sample("fits nowhere"), fits=False)
    assert select([too_long], "best")[0].why == "over_max_seq_len"
    # None scores (scorer=none) with a min_score set are below it.
    assert select([sample("x y z", None)], "best", min_score=0.0)[0].why == "below_min_score"


def test_near_duplicates_are_dropped():
    base = "the answer is forty two because six times seven is forty two"
    samples = [sample(base), sample(base + " ."), sample("a completely different line of reasoning gives 42")]
    decisions = select(samples, "all_passing", dedupe=0.8)
    assert [d.why for d in decisions] == ["kept", "duplicate", "kept"]
    assert kept(select(samples, "all_passing", dedupe=None)) == [0, 1, 2]  # off
    # Exact duplicates only at 1.0; whitespace and case do not make a reply new.
    same = [sample("Hello  World again"), sample("hello world again")]
    assert [d.why for d in select(same, "all_passing", dedupe=1.0)] == ["kept", "duplicate"]


def test_similarity():
    a, b = shingles("one two three four"), shingles("one two three five")
    assert similarity(a, a) == 1.0
    assert similarity(a, b) == pytest.approx(1 / 3)  # {123, 234} vs {123, 235}
    assert similarity(shingles(""), shingles("")) == 1.0


def test_unknown_rule():
    with pytest.raises(ValueError):
        select([sample("x")], "worst")
