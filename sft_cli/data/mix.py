"""Deterministic train/eval split and weighted mixing of sources (pure numpy).

    >>> split_indices(np.arange(10), eval_fraction=0.2, seed=0, salt=0)[1].size
    2
    >>> counts = mix_counts({"chat": 900, "text": 900}, {"chat": 0.9, "text": 0.1})
    >>> counts
    {'chat': 1620, 'text': 180}
"""

from __future__ import annotations

import numpy as np


def split_indices(indices: np.ndarray, eval_fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out round(eval_fraction * n) examples (at least 1 when the fraction is > 0 and n >= 2)."""
    n = len(indices)
    if eval_fraction <= 0 or n < 2:
        return indices, indices[:0]
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    order = np.random.default_rng([seed, salt, 1]).permutation(n)
    return np.sort(indices[order[n_eval:]]), np.sort(indices[order[:n_eval]])


def mix_counts(sizes: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """Examples each source contributes so that shares follow `weights`; the total stays sum(sizes).

    Keeping the total fixed means weights reshape the mix without inflating or shrinking an epoch.
    """
    total = sum(sizes.values())
    weight_sum = sum(weights.values())
    return {name: int(round(total * weights[name] / weight_sum)) for name in sizes}


def sample(indices: np.ndarray, count: int, seed: int, salt: int) -> np.ndarray:
    """`count` examples from `indices`: whole copies first, then a random subset (no repeats within it)."""
    rng = np.random.default_rng([seed, salt, 2])
    copies, rest = divmod(count, len(indices))
    picked = [indices] * copies + [indices[np.sort(rng.permutation(len(indices))[:rest])]]
    return np.concatenate(picked)
