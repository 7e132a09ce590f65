"""`sft evaluate`: packed and unpacked eval agree, the CLI report is consistent with training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_cli.data.packing import IGNORE_INDEX
from sft_cli.evaluate import distinct_n, split_metrics
from tests.conftest import WORDS, write_chat_jsonl

REPO = Path(__file__).resolve().parent.parent


def test_distinct_n_by_hand():
    assert distinct_n([[1, 2, 1, 2]], 1) == 2 / 4
    assert distinct_n([[1, 2, 1, 2]], 2) == 2 / 3  # (1,2) (2,1) (1,2)
    assert distinct_n([[1, 2], [3]], 2) == 1.0
    assert distinct_n([], 2) == 0.0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_and_unpacked_eval_give_the_same_loss(tiny_dir, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir("chatml", arch)), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    rng = np.random.default_rng(0)
    examples = []
    for i in range(30):
        ids = rng.integers(3, model.config.vocab_size, size=int(rng.integers(3, 50))).tolist()
        labels = [IGNORE_INDEX] + [t if rng.random() < 0.6 else IGNORE_INDEX for t in ids[1:]]
        examples.append({"input_ids": ids, "labels": labels, "source": "a" if i % 3 else "b"})
    packed = split_metrics(model, examples, micro_batch_size=3, packed=True, max_seq_len=128)
    alone = split_metrics(model, examples, micro_batch_size=3, packed=False)
    assert packed["tokens"] == alone["tokens"] == sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples)
    assert packed["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert packed["token_accuracy"] == alone["token_accuracy"]
    assert set(packed["by_source"]) == {"a", "b"}
    for name in ("a", "b"):
        assert packed["by_source"][name]["loss"] == pytest.approx(alone["by_source"][name]["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(1)
    chat, text = write_chat_jsonl(root / "chat.jsonl", rows=100, max_words=30), root / "text.jsonl"
    with open(text, "w") as handle:
        for _ in range(40):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=30))}) + "\n")
    run_dir = root / "run"
    args = ["model.name_or_path=builtin:tiny-llama-chatml", f"data.sources=[{{path: {chat}}}, "
            f"{{path: {text}, format: text}}]", "data.eval_fraction=0.2", "max_seq_len=256", f"run_dir={run_dir}",
            "trainer.micro_batch_size=2", "trainer.max_steps=4", "optim.lr=3e-3"]
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "sft_cli", "train", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_evaluate_cli_reports_base_vs_tuned(trained_run, sft):
    result = sft("evaluate", f"run_dir={trained_run}", "eval.num_prompts=3", "eval.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    report = json.loads((trained_run / "eval" / "report.json").read_text())
    tuned, base = report["models"]["tuned"], report["models"]["base"]
    # Same packing and masking as training: the final eval loss logged by `sft train` is reproduced.
    logged = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert tuned["loss"] == pytest.approx([r for r in logged if r.get("type") == "eval"][-1]["eval_loss"], rel=1e-5)
    assert tuned["loss"] < base["loss"]  # it learned something from the training data
    assert set(tuned["by_source"]) == {"chat", "text"}
    for model in (tuned, base):
        assert model["forgetting_ppl"] > 1 and 0 <= model["generation"]["distinct_2"] <= 1
        assert 0 <= model["generation"]["stopped_on_own"] <= 1
    assert set(report["comparison"]) == {"eval_loss_delta", "forgetting_ppl_ratio", "distinct_2_ratio"}
    rows = [json.loads(x) for x in (trained_run / "eval" / "generations.jsonl").read_text().splitlines()]
    assert {(r["model"], r["mode"]) for r in rows} == {(m, k) for m in ("tuned", "base") for k in ("greedy", "sampled")}
    assert len(rows) == 12 and all(r["new_tokens"] <= 8 for r in rows)
    assert (trained_run / "eval" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_without_a_trained_model_says_train_first(tmp_path, sft):
    result = sft("evaluate", "model.name_or_path=builtin:tiny-llama-chatml", f"run_dir={tmp_path / 'none'}",
                 f"data.sources=[{{path: {tmp_path / 'x.jsonl'}}}]")
    assert result.returncode == 1 and "train first" in result.stderr and "Traceback" not in result.stderr
