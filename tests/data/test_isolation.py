"""Packed examples are independent: each example's logits and loss inside a packed, padded batch
equal those computed for it alone (float32, tiny models, every attention backend we allow on CPU)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sft_cli.data.collate import Collator
from sft_cli.data.packing import IGNORE_INDEX, mask_example_starts, position_ids
from sft_cli.pack import plan_rows

CPU_BACKENDS = ["eager", "sdpa"]


def random_examples(n, vocab, seed):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(2, 40))
        ids = rng.integers(3, vocab, size=length)
        labels = np.where(rng.random(length) < 0.6, ids, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX
        examples.append((ids, labels))
    return examples


def packed_rows(examples, max_seq_len, seed):
    rows = []
    for row in plan_rows([len(ids) for ids, _ in examples], "bfd", max_seq_len, seed):
        members = [examples[i] for i, _, _ in row]
        seq_lens = [len(ids) for ids, _ in members]
        rows.append({"input_ids": np.concatenate([ids for ids, _ in members]).tolist(),
                     "labels": mask_example_starts(np.concatenate([lab for _, lab in members]), seq_lens).tolist(),
                     "position_ids": position_ids(seq_lens).tolist(), "seq_lens": seq_lens,
                     "example_ids": [i for i, _, _ in row]})
    return rows


def summed_loss(logits, labels):
    """Sum of next-token cross-entropy over trained positions: logits[t] predicts labels[t+1]."""
    return F.cross_entropy(logits[:-1].float(), torch.as_tensor(labels[1:]), ignore_index=IGNORE_INDEX,
                           reduction="sum")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_logits_equal_unpacked(tiny_dir, arch, backend):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir("chatml", arch)), dtype=torch.float32,
                                                 attn_implementation=backend).eval()
    examples = random_examples(24, model.config.vocab_size, seed=0)
    rows = packed_rows(examples, max_seq_len=96, seed=0)
    assert any(len(r["seq_lens"]) > 2 for r in rows)  # real packing happened
    batch = Collator(pad_id=0)(rows[:4])
    with torch.no_grad():
        # use_cache=False matters: with a KV cache transformers skips packed-sequence detection
        # (masking_utils) and examples attend to each other silently.
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        worst = 0.0
        for b, row in enumerate(rows[:4]):
            offset = 0
            for example_id, n in zip(row["example_ids"], row["seq_lens"]):
                ids, labels = examples[example_id]
                alone = model(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0]
                packed = logits[b, offset:offset + n]
                worst = max(worst, (alone - packed).abs().max().item())
                torch.testing.assert_close(summed_loss(packed, labels), summed_loss(alone, labels),
                                           rtol=1e-5, atol=1e-5)
                offset += n
    assert worst <= 1e-5, worst


def test_boundary_labels_never_cross_examples(tiny_dir):
    examples = random_examples(30, 500, seed=1)
    for row in packed_rows(examples, max_seq_len=80, seed=1):
        starts = np.cumsum(row["seq_lens"]) - np.asarray(row["seq_lens"])
        # After the shift, position s-1 (last token of the previous example) predicts labels[s].
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
