"""Which of a prompt's scored samples become training data (`gen.select`), and why the others did not.

    best          one reply per prompt: the highest score
    all_passing   every passing reply
    top_k         the k best passing replies (gen.select_k)

A reply is eligible when its scorer passed it, it scores at least `min_score` (when set), it ended on
a stop token (unless `keep_truncated`: a reply cut at max_new_tokens teaches the model not to stop),
it has content, and it fits max_seq_len with its prompt (`fits`, when given). Eligible replies are
ranked by score, then shorter first (of equally good replies the concise one; it also counters the
length bias of reward models; unscored replies skip this), then sample index, so ties break the same
way on every run. Walking that ranking, a reply too similar to one already kept (word-trigram
Jaccard >= `dedupe`) is dropped as a duplicate: N near-identical copies of one answer would weight it
N times in training and cost diversity.

    decisions = select(samples, rule="best")   # samples: [{"score", "passed", "stopped", "content", "tokens"}]
    [d.kept for d in decisions]                # one Decision per sample, in input order
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

RULES = ("best", "all_passing", "top_k")  # config.GEN_SELECTIONS


@dataclass(frozen=True)
class Decision:
    kept: bool
    why: str  # "kept", or why not: not_passing, below_min_score, truncated, empty, over_max_seq_len,
    # duplicate, not_selected


def shingles(text: str, n: int = 3) -> frozenset:
    """Word n-grams of a text (lower-cased); texts shorter than n words give their words."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    if len(words) < n:
        return frozenset((w,) for w in words)
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def similarity(a: frozenset, b: frozenset) -> float:
    """Jaccard similarity of two shingle sets (1.0 for two empty texts)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _ineligible(sample: dict, min_score: float | None, keep_truncated: bool) -> str | None:
    if not sample["passed"]:
        return "not_passing"
    if min_score is not None and not (sample["score"] is not None and sample["score"] >= min_score):
        return "below_min_score"
    if not sample["stopped"] and not keep_truncated:
        return "truncated"
    if not sample["content"].strip():
        return "empty"
    if not sample.get("fits", True):
        return "over_max_seq_len"
    return None


def select(samples: list[dict], rule: str = "best", k: int = 1, min_score: float | None = None,
           dedupe: float | None = 0.9, keep_truncated: bool = False) -> list[Decision]:
    """One Decision per sample (in input order) for one prompt's samples."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; use one of {RULES}")
    limit = {"best": 1, "top_k": k, "all_passing": math.inf}[rule]
    decisions: list[Decision | None] = [None] * len(samples)
    eligible = []
    for i, sample in enumerate(samples):
        why = _ineligible(sample, min_score, keep_truncated)
        if why:
            decisions[i] = Decision(False, why)
        else:
            eligible.append(i)
    score = [s["score"] if s["score"] is not None else 0.0 for s in samples]
    # Unscored samples (scorer none) rank by sample index alone: preferring the shortest of N replies
    # would bias distillation data toward terse answers.
    eligible.sort(key=lambda i: (-score[i], samples[i]["tokens"] if samples[i]["score"] is not None else 0, i))
    kept: list[frozenset] = []
    for i in eligible:
        text = samples[i]["content"] + "\n" + (samples[i].get("reasoning") or "")
        grams = shingles(text)
        if dedupe is not None and any(similarity(grams, other) >= dedupe for other in kept):
            decisions[i] = Decision(False, "duplicate")
        elif len(kept) < limit:
            kept.append(grams)
            decisions[i] = Decision(True, "kept")
        else:
            decisions[i] = Decision(False, "not_selected")
    return decisions
