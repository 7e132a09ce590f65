"""GPU-only checks (skipped without CUDA; CI never has one): the bf16 path.
Run on a GPU machine with `pytest -m gpu tests/test_gpu.py`; numbers go to BENCHMARKS.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_chat_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _chat_file(tmp_path):
    return write_chat_jsonl(tmp_path / "chat.jsonl", rows=200, max_words=60)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex_attention"])
def test_packed_isolation_in_bf16(tiny_dir, backend):
    from transformers import AutoModelForCausalLM

    from sft_cli.data.collate import Collator
    from tests.data.test_isolation import packed_rows, random_examples

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir("chatml", "llama")), dtype=torch.bfloat16,
                                                 attn_implementation=backend).cuda().eval()
    examples = random_examples(24, model.config.vocab_size, seed=0)
    rows = packed_rows(examples, max_seq_len=96, seed=0)
    batch = Collator(pad_id=0)(rows[:4])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                       use_cache=False).logits.float()
        worst, scale = 0.0, 0.0
        for r, row in enumerate(rows[:4]):
            offset = 0
            for i, n in zip(row["example_ids"], row["seq_lens"]):
                ids = torch.as_tensor(examples[i][0]).cuda()[None]
                alone = model(input_ids=ids, use_cache=False).logits.float()[0]
                worst = max(worst, (logits[r, offset:offset + n] - alone).abs().max().item())
                scale = max(scale, alone.abs().max().item())
                offset += n
    print(f"bf16 {backend}: max |packed - alone| = {worst:.4g} (logit scale {scale:.3g})")
    # bf16 keeps 8 bits of mantissa: a leak would shift logits by O(scale), rounding by ~scale/128.
    assert worst <= 2e-2 * max(scale, 1.0)


def test_fsdp2_one_rank_bf16_trains_under_torchrun_nccl(tmp_path):
    args = ["model.name_or_path=builtin:tiny-llama-chatml", f"data.sources=[{{path: {_chat_file(tmp_path)}}}]",
            "max_seq_len=256", f"run_dir={tmp_path / 'run'}", "trainer.micro_batch_size=4", "trainer.max_steps=10",
            "optim.lr=3e-3", "peft=none", "model.dtype=bfloat16", "trainer.parallel=fsdp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "sft_cli", "train", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parallel: fsdp" in result.stdout  # one rank, still sharded through fully_shard (nccl group)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    print("fsdp2 bf16 one-rank losses:", [round(v, 4) for v in losses])
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(p.name == "dcp" for p in (tmp_path / "run" / "checkpoints").glob("step-*/*"))
