"""Chunked cross-entropy equals the plain one and never touches untrained positions."""

import torch
import torch.nn.functional as F

from sft_cli.loss import IGNORE_INDEX, chunked_ce_sum, count_targets


def test_chunked_equals_full_and_skips_ignored_positions():
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 8, dtype=torch.float64)
    head = torch.nn.Linear(8, 50, bias=False).double()
    labels = torch.randint(0, 50, (3, 17))
    labels[torch.rand(3, 17) < 0.5] = IGNORE_INDEX
    seen = []
    head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    total, n = chunked_ce_sum(hidden, labels, head, chunk=5)
    logits = head(hidden)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(total.double(), reference, rtol=1e-6, atol=1e-6)
    assert n == count_targets(labels) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert sum(seen[:-1]) == n and max(seen[:-1]) <= 5  # only trained positions, 5 at a time


def test_no_targets_still_backpropagates():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 10)
    total, n = chunked_ce_sum(hidden, torch.full((1, 4), IGNORE_INDEX), head)
    total.backward()
    assert n == 0 and total.item() == 0 and hidden.grad is not None
