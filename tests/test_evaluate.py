"""`sft evaluate`: packed, unpacked, padded and flat eval agree, the CLI report is consistent with
training and runs on the run's device in the run's dtype."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sft_cli.data.packing import IGNORE_INDEX
from sft_cli.evaluate import distinct_n, split_metrics
from sft_cli.model import load_for_inference
from tests.conftest import _run_sft, write_chat_jsonl

REPO = Path(__file__).resolve().parent.parent


def test_distinct_n_by_hand():
    assert distinct_n([[1, 2, 1, 2]], 1) == 2 / 4
    assert distinct_n([[1, 2, 1, 2]], 2) == 2 / 3  # (1,2) (2,1) (1,2)
    assert distinct_n([[1, 2], [3]], 2) == 1.0
    assert distinct_n([], 2) == 0.0


def _tiny_model(tiny_dir, arch):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir("chatml", arch)), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


def _random_examples(model, count: int = 30, seed: int = 0) -> list[dict]:
    """Random ids, ~60% of positions trained, sources a / b (every third is b)."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        ids = rng.integers(3, model.config.vocab_size, size=int(rng.integers(3, 50))).tolist()
        labels = [IGNORE_INDEX] + [t if rng.random() < 0.6 else IGNORE_INDEX for t in ids[1:]]
        examples.append({"input_ids": ids, "labels": labels, "source": "a" if i % 3 else "b"})
    return examples


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_and_unpacked_eval_give_the_same_loss(tiny_dir, arch):
    model = _tiny_model(tiny_dir, arch)
    examples = _random_examples(model)
    packed = split_metrics(model, examples, micro_batch_size=3, packed=True, max_seq_len=128)
    alone = split_metrics(model, examples, micro_batch_size=3, packed=False)
    assert packed["tokens"] == alone["tokens"] == sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples)
    assert packed["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert packed["token_accuracy"] == alone["token_accuracy"]
    assert set(packed["by_source"]) == {"a", "b"}
    for name in ("a", "b"):
        assert packed["by_source"][name]["loss"] == pytest.approx(alone["by_source"][name]["loss"], rel=1e-5)


@torch.no_grad()
def test_flat_and_padded_layouts_match_each_example_scored_alone(tiny_dir):
    """The flat (1, T) stream of varlen backends, padded rows and unpacked scoring give the numbers of
    a plain forward over each example alone (sdpa reads restarting position_ids as separate examples)."""
    model = _tiny_model(tiny_dir, "llama")
    examples = _random_examples(model, seed=1)
    # Greedy continuations as examples too, so token accuracy is far from 0 and is really compared.
    for i in range(6):
        prompt = examples[i]["input_ids"][:4]
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0].tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 4 + ids[4:], "source": "greedy"})
    expected = {}  # source -> [loss sum, correct, tokens], each example through the full model alone
    for e in examples:
        targets = torch.tensor(e["labels"][1:])
        keep = targets != IGNORE_INDEX
        logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1][keep].float()
        s = expected.setdefault(e["source"], [0.0, 0, 0])
        s[0] += F.cross_entropy(logits, targets[keep], reduction="sum").item()
        s[1] += int((logits.argmax(-1) == targets[keep]).sum())
        s[2] += int(keep.sum())
    assert expected["greedy"][1] >= expected["greedy"][2] // 2

    flat = split_metrics(model, examples, micro_batch_size=3, max_seq_len=128, flat=True)
    padded = split_metrics(model, examples, micro_batch_size=3, max_seq_len=128, flat=False)
    alone = split_metrics(model, examples, micro_batch_size=3, packed=False)
    chosen = split_metrics(model, examples, micro_batch_size=3, max_seq_len=128)  # sdpa: padded
    assert chosen == padded
    for result in (flat, padded, alone):
        assert set(result["by_source"]) == set(expected)
        assert result["tokens"] == sum(s[2] for s in expected.values())
        assert result["loss"] == pytest.approx(sum(s[0] for s in expected.values()) / result["tokens"], abs=1e-5)
        for name, (loss, correct, tokens) in expected.items():
            got = result["by_source"][name]
            assert got["tokens"] == tokens and got["token_accuracy"] == correct / tokens
            assert got["loss"] == pytest.approx(loss / tokens, abs=1e-5)
    assert flat["loss"] == pytest.approx(padded["loss"], abs=1e-5)
    assert flat["token_accuracy"] == padded["token_accuracy"] == alone["token_accuracy"]


def _train(run_dir: Path, sources: str, *overrides: str) -> Path:
    args = ["model.name_or_path=builtin:tiny-llama-chatml", f"data.sources={sources}", "data.eval_fraction=0.2",
            "max_seq_len=256", f"run_dir={run_dir}", "trainer.micro_batch_size=2", "trainer.max_steps=4",
            "optim.lr=3e-3", *overrides]
    result = _run_sft("train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_evaluate_cli_reports_base_vs_tuned(lora_run_copy, sft):
    trained_run = lora_run_copy  # conftest.lora_run: a chat and a text source
    result = sft("evaluate", f"run_dir={trained_run}", "eval.num_prompts=3", "eval.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    report = json.loads((trained_run / "eval" / "report.json").read_text())
    assert (report["device"], report["dtype"]) == ("cpu", "float32")  # model.dtype=auto on a CPU
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


def test_bfloat16_run_evaluates_in_bfloat16_on_the_run_device(tmp_path, sft, monkeypatch):
    """A full fine-tune in bfloat16: evaluation loads both models in bfloat16 on distributed.device()
    and says so in report.json and on the console."""
    from sft_cli import distributed
    from sft_cli.config import load_config
    from sft_cli.prepare import load_prepared_tokenizer

    chat = write_chat_jsonl(tmp_path / "chat.jsonl", rows=40, max_words=20)
    run_dir = _train(tmp_path / "run", f"[{{path: {chat}}}]", "model.dtype=bfloat16", "peft.method=none",
                     "trainer.max_steps=2")
    result = sft("evaluate", f"run_dir={run_dir}", "eval.num_prompts=2", "eval.max_new_tokens=4")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert (report["device"], report["dtype"]) == ("cpu", "bfloat16")
    assert "evaluated on cpu in bfloat16" in result.stdout
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert report["models"]["tuned"]["loss"] == pytest.approx(
        [r for r in logged if r.get("type") == "eval"][-1]["eval_loss"], rel=1e-2)  # bf16 weights vs training's
    # float32 masters under autocast: close, not equal (2e-4 apart when written)

    asked = []
    monkeypatch.setattr(distributed, "device", lambda: asked.append(1) or torch.device("cpu"))
    cfg, tokenizer = load_config(str(run_dir / "config.yaml")), load_prepared_tokenizer(run_dir / "prepared")
    for path in (run_dir / "final", None):  # tuned, base
        model = load_for_inference(cfg.model, tokenizer, path)
        assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")}
    assert len(asked) == 2
