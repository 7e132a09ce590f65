"""Masked loss, perplexity and token accuracy of a model over a split, overall and per source: the
one evaluation that training's periodic eval (train.py) and `sft evaluate` (evaluate.py) both run.

    scores = score(parallel_model, batches, num_sources=2)   # this rank's collated micro-batches
    scores.summary()       # {"loss", "ppl", "token_accuracy", "tokens"} over every rank
    scores.summary(1)      # the same for source 1

A batch may carry "target_sources": the (N,) source code of each trained position (else source 0).
Sums stay on the device until the end: one device-to-host read and one collective per split.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sft_cli.data.collate import model_inputs
from sft_cli.distributed import all_reduce_max, all_reduce_sum_array
from sft_cli.precision import Precision


@dataclass
class Scores:
    loss_sum: np.ndarray  # (sources,) float64: summed CE
    correct: np.ndarray  # (sources,) int64: positions whose argmax is the target
    tokens: np.ndarray  # (sources,) int64: trained positions

    def summary(self, source: int | None = None) -> dict:
        pick = slice(None) if source is None else slice(source, source + 1)
        loss, correct, tokens = float(self.loss_sum[pick].sum()), int(self.correct[pick].sum()), int(self.tokens[pick].sum())
        mean = loss / max(tokens, 1)
        return {"loss": mean, "ppl": math.exp(min(mean, 50)), "token_accuracy": correct / max(tokens, 1),
                "tokens": tokens}


@torch.no_grad()
def score(model, batches: Sequence[dict], num_sources: int = 1, precision: Precision | None = None,
          spare: dict | None = None) -> Scores:
    """Scores of `model` (model.SFTModel, maybe DDP/FSDP2-wrapped) on this rank's `batches`, summed
    over every rank.

    Every rank runs the same number of forwards: FSDP2's forward is collective, so a rank with fewer
    batches repeats its last one (or `spare`, when it has none) with the result discarded.
    """
    where = next(model.parameters()).device
    loss_sum = torch.zeros(num_sources, dtype=torch.float64, device=where)
    correct = torch.zeros(num_sources, dtype=torch.int64, device=where)
    tokens = np.zeros(num_sources, dtype=np.int64)
    was_training = model.training
    model.eval()
    for i in range(int(all_reduce_max(len(batches)))):
        batch = batches[min(i, len(batches) - 1)] if batches else spare
        inputs = {k: v.to(where, non_blocking=True) if isinstance(v, torch.Tensor) else v
                  for k, v in model_inputs(batch).items()}
        with precision.autocast() if precision else contextlib.nullcontext():
            losses, hits = model(**inputs, target_index=batch["target_index"].to(where),
                                 targets=batch["targets"].to(where), per_token=True)
        if i >= len(batches):
            continue
        codes = batch.get("target_sources")
        codes = np.zeros(len(batch["targets"]), np.int64) if codes is None else np.asarray(codes, np.int64)
        index = torch.from_numpy(codes).to(where)
        loss_sum.index_add_(0, index, losses.double())
        correct.index_add_(0, index, hits.long())
        tokens += np.bincount(codes, minlength=num_sources)
    model.train(was_training)
    totals = all_reduce_sum_array(np.concatenate([loss_sum.cpu().numpy(), correct.cpu().numpy(), tokens]))
    return Scores(loss_sum=totals[:num_sources], correct=totals[num_sources:2 * num_sources].astype(np.int64),
                  tokens=totals[2 * num_sources:].astype(np.int64))


def distinct_n(replies: list[list], n: int) -> float:
    """Unique n-grams / all n-grams over a set of replies, each a list of tokens or words (Li et al., 2016):
    1.0 = no repetition. sft evaluate counts token ids, sft generate words."""
    grams = [tuple(r[i:i + n]) for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
