"""Packed rows -> model inputs, with no attention across examples and no padding in the loss.

Two layouts, chosen by what the attention backend can do:

    padded (eager / sdpa / flex, CPU or GPU)    (B, L_max): rows padded to the longest row
        input_ids     a a a b b | c c c c pad pad       pads form one more "example" whose
        position_ids  0 1 2 0 1 | 0 1 2 3  0   1        positions restart at 0, so no real token
        labels              ... |            -100 -100  attends to them (causal + block mask)
    flat (flash_attention_2/3: varlen kernels)   (1, sum L): all rows back to back, no padding;
        position_ids restart per example and the kernel reads sequence boundaries from them.

No `attention_mask` is passed in either: with position_ids alone, transformers builds the
block-diagonal causal mask (masking_utils.find_packed_sequence_indices). The flat layout also
carries the varlen kernels' own boundaries (`cu_seq_lens_q/k`, `max_length_q/k`), computed here on
the CPU: without them transformers derives them from position_ids on the GPU in every layer, a
host-device sync each time.

Everything the loss needs is computed here too, on the CPU, so the training loop never asks the
GPU how many tokens it trains on: `target_index` (flat positions in B x T whose next token is
trained) and `targets` (those next tokens). `num_targets` is their count as a Python int.

    collate = Collator(pad_id=0)
    batch = collate([row_a, row_b])   # input_ids, labels, position_ids, target_index, targets, seq_lens
    model_inputs(batch)               # the keyword arguments of the decoder's forward
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sft_cli.data.packing import IGNORE_INDEX

VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3")
# Keys of a batch that the decoder's forward takes (the varlen ones only in the flat layout).
MODEL_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class Collator:
    pad_id: int
    flat: bool = False  # one (1, T) stream for varlen kernels

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor | list]:
        if self.flat:
            cat = {key: np.concatenate([np.asarray(row[key], dtype=np.int64) for row in rows])[None]
                   for key in ("input_ids", "labels", "position_ids")}
            seq_lens = [int(n) for row in rows for n in row["seq_lens"]]
            cu = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int32)
            longest = max(seq_lens)
            batch = {key: torch.from_numpy(values) for key, values in cat.items()}
            batch |= {"cu_seq_lens_q": torch.from_numpy(cu), "cu_seq_lens_k": torch.from_numpy(cu.copy()),
                      "max_length_q": longest, "max_length_k": longest, "seq_lens": [seq_lens]}
            return batch | _targets(cat["labels"])
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((len(rows), longest), dtype=np.int64)
        seq_lens = []
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = row["input_ids"]
            labels[i, :n] = row["labels"]
            positions[i, :n] = row["position_ids"]
            positions[i, n:] = np.arange(longest - n)  # the padding is its own block
            seq_lens.append(list(row["seq_lens"]))
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions), "seq_lens": seq_lens} | _targets(labels)


def _targets(labels: np.ndarray) -> dict:
    """The next-token targets that are trained: position t predicts labels[t + 1]."""
    shifted = np.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat = shifted.reshape(-1)
    index = np.flatnonzero(flat != IGNORE_INDEX)
    return {"target_index": torch.from_numpy(index), "targets": torch.from_numpy(flat[index]),
            "num_targets": int(index.size)}


def model_inputs(batch: dict) -> dict:
    """The decoder's keyword arguments from a collated batch."""
    return {key: batch[key] for key in MODEL_KEYS if key in batch}


def pin(batch: dict) -> dict:
    """Page-locked copies of a batch's tensors, so the copy to the GPU can overlap compute."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def length_grouped_batches(lengths, batch_size: int, seed: int, mega: int = 64) -> list[list[int]]:
    """Batches of similar-length rows (little padding) in a seeded random order.

    Shuffle, cut into mega-batches of `mega * batch_size`, sort each by length, slice into
    batches, shuffle the batches: close lengths within a batch, no global length order.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    batches = []
    span = mega * batch_size
    for lo in range(0, len(order), span):
        group = order[lo:lo + span]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[i:i + batch_size].tolist() for i in range(0, len(group), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
