"""Next-token cross-entropy summed over trained positions only, a chunk at a time.

Full logits for a micro-batch are (B, T, vocab) floats: 4 x 2048 x 49k x 4 bytes = 1.6 GB.
We gather the hidden states of positions whose target is trained and run the LM head on
`chunk` of them at a time, so the float32 logits alive at once are chunk x vocab, and
positions with label -100 never reach the head at all.

    total, count = chunked_ce_sum(hidden, labels, head)   # divide by the step's token count later
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]; the last position has no target."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def chunked_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk: int = 2048,
                   softcap: float | None = None) -> tuple[torch.Tensor, int]:
    """(sum of CE over trained positions, number of them). hidden: (B, T, H); labels: (B, T)."""
    targets = shifted_targets(labels)
    keep = targets != IGNORE_INDEX
    picked = hidden[keep]          # (N, H): only positions that are trained
    wanted = targets[keep]         # (N,)
    # Start from a zero that is still attached to the graph: a micro-batch with no trained
    # position must still backpropagate (DDP waits for every parameter's gradient).
    total = hidden.sum().float() * 0.0
    for lo in range(0, picked.shape[0], chunk):
        logits = head(picked[lo:lo + chunk]).float()  # (chunk, vocab) in float32 for a stable softmax
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        total = total + F.cross_entropy(logits, wanted[lo:lo + chunk], reduction="sum")
    return total, int(wanted.numel())


def linear_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int = 2048,
                  softcap: float | None = None) -> torch.Tensor:
    """Sum of CE of head(hidden) against targets, chunk rows at a time. hidden: (N, H), targets: (N,)."""
    total = hidden.sum().float() * 0.0  # attached to the graph even when N == 0 (DDP waits for every grad)
    for lo in range(0, hidden.shape[0], chunk):
        logits = head(hidden[lo:lo + chunk]).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        total = total + F.cross_entropy(logits, targets[lo:lo + chunk], reduction="sum")
    return total


def count_targets(labels: torch.Tensor) -> int:
    return int((shifted_targets(labels) != IGNORE_INDEX).sum())
