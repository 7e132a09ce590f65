"""The training loop: gradients independent of how a step is split, the real `sft train`
end to end with pinned losses, exact resume after SIGKILL, NaN steps skipped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_cli.config import SFTConfig
from sft_cli.data.collate import Collator
from sft_cli.data.packing import IGNORE_INDEX, mask_example_starts, position_ids
from sft_cli.model import SFTModel, load_model
from sft_cli.train import accumulate_gradients
from tests.conftest import train_args, write_chat_jsonl

REPO = Path(__file__).resolve().parent.parent


def packed_rows(n_rows, vocab, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        seq_lens = rng.integers(3, 30, size=int(rng.integers(1, 4))).tolist()
        ids = rng.integers(3, vocab, size=sum(seq_lens))
        labels = np.where(rng.random(len(ids)) < 0.7, ids, IGNORE_INDEX)
        rows.append({"input_ids": ids.tolist(), "labels": mask_example_starts(labels, seq_lens).tolist(),
                     "position_ids": position_ids(seq_lens).tolist(), "seq_lens": seq_lens})
    return rows


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_step_gradient_does_not_depend_on_the_split(tiny_dir, peft):
    from transformers import AutoTokenizer

    cfg = SFTConfig()
    cfg.model.name_or_path = str(tiny_dir("chatml"))
    cfg.model.dtype = "float32"
    cfg.peft.method, cfg.peft.dropout = peft, 0.0
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    rows = packed_rows(8, len(tokenizer))
    collate = Collator(pad_id=0)
    grads = {}
    for micro, accum in ((8, 1), (4, 2), (1, 8)):
        torch.manual_seed(0)  # same LoRA init for every split
        model, _ = load_model(cfg, tokenizer, cfg.model.name_or_path)
        batches = [collate(rows[i * micro:(i + 1) * micro]) for i in range(accum)]
        step_targets = sum(b["num_targets"] for b in batches)
        loss = accumulate_gradients(SFTModel(model), batches, step_targets).item() / step_targets
        grads[(micro, accum)] = (loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    reference_loss, reference = grads[(8, 1)]
    for split, (loss, grad) in grads.items():
        assert abs(loss - reference_loss) <= 1e-6 * abs(reference_loss), split
        assert ((grad - reference).abs().max() / reference.abs().max()).item() <= 1e-6, split


# -- the real CLI ---------------------------------------------------------------------------------

def _data(tmp_path):
    return write_chat_jsonl(tmp_path / "data.jsonl", rows=120, max_words=40)


def _train_args(tmp_path, run, *extra):
    return train_args(_data(tmp_path), tmp_path / run, "trainer.micro_batch_size=2", "trainer.grad_accum=2",
                      "trainer.max_steps=8", "trainer.save_every=2", "optim.lr=2e-3", "trainer.log_every=1", *extra)


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def _weights(run_dir):
    from safetensors.torch import load_file

    folder = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[-1]
    return load_file(str(folder / "trainable.safetensors"))


def test_train_end_to_end_pins_losses(lora_run):
    run_dir = lora_run  # conftest: prepare, pack, train through the CLI
    losses = _losses(run_dir)
    assert len(losses) == 6
    # Pinned: the tiny model, data and seed are fixed, so these change only if the math does.
    assert losses[:3] == pytest.approx(PINNED_FIRST_LOSSES, abs=1e-4)
    assert losses[-1] < losses[0]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "loss_tokens", "tokens_per_sec", "mfu", "peak_mem_mb",
                "elapsed_s"):
        assert key in lines[0]
    assert any(r.get("type") == "eval" for r in lines)
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(Path(json.loads(
        (run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"])))
    PeftModel.from_pretrained(base, str(run_dir / "final"))
    assert AutoTokenizer.from_pretrained(str(run_dir / "final")).chat_template


PINNED_FIRST_LOSSES = [6.198344, 6.129737, 6.040377]  # dropout noise seeded per (step, rank): train.seed_step


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, sft, mode):
    extra = ["trainer.neftune_alpha=5", "peft.dropout=0.1"] + (["peft=none"] if mode == "full" else [])
    straight = sft(*_train_args(tmp_path, "straight", *extra))
    assert straight.returncode == 0, straight.stderr[-3000:]
    env = {**os.environ, "SFT_FAULT_KILL_STEP": "5"}
    killed = subprocess.run([sys.executable, "-m", "sft_cli", *_train_args(tmp_path, "resumed", *extra)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    # Killed in step 5 (after its backward, before its update): steps 1-4 logged, checkpoints 2 and 4.
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")[:4]
    resumed = sft(*_train_args(tmp_path, "resumed", *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in _said(resumed) and "(step 4 of 8)" in _said(resumed), resumed.stderr[-3000:]
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")  # bitwise: exact float equality
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_run(tmp_path, sft):
    run_dir = tmp_path / "r"
    env = {**os.environ, "SFT_FAULT_KILL_STEP": "3"}
    killed = subprocess.run([sys.executable, "-m", "sft_cli", *_train_args(tmp_path, "r")], cwd=REPO, env=env,
                            capture_output=True, text=True)
    # The kill landed in step 3: a run to resume exists (checkpoint 2, steps 1-2 logged).
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-2"]
    logged, before = (run_dir / "metrics.jsonl").read_text(), _losses(run_dir)
    assert len(before) == 2
    # Resuming with a run-defining key changed is refused, naming the change and the way out, and
    # touches nothing: same checkpoint, same metrics.
    changed = sft(*_train_args(tmp_path, "r", "optim.lr=1e-3"))
    assert changed.returncode == 1, changed.stderr[-3000:]
    said = _said(changed)
    assert "refusing to resume" in said and "optim.lr: 0.002 -> 0.001" in said and "resume=never" in said, said
    assert "Traceback" not in changed.stderr
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-2"]
    assert (run_dir / "metrics.jsonl").read_text() == logged
    # trainer.resume=never starts over: all 8 steps from the same initial weights (same first loss).
    fresh = sft(*_train_args(tmp_path, "r", "optim.lr=1e-3", "trainer.resume=never"))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "resuming" not in fresh.stderr
    losses = _losses(run_dir)
    assert len(losses) == 8 and losses[0] == before[0]


def _said(result) -> str:
    """stderr with rich's line wrapping undone, for matching phrases."""
    return " ".join(result.stderr.split())


def test_nan_steps_are_skipped_then_stop(tmp_path, sft, monkeypatch):
    monkeypatch.setenv("SFT_FAULT_NAN_STEPS", "3,4")
    result = sft(*_train_args(tmp_path, "nan"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 3: non-finite" in result.stderr and "step 4: non-finite" in result.stderr
    weights = _weights(tmp_path / "nan")
    assert all(torch.isfinite(t).all() for t in weights.values())
    monkeypatch.setenv("SFT_FAULT_NAN_STEPS", "2,3,4,5")
    stopped = sft(*_train_args(tmp_path, "nan2", "trainer.max_bad_steps=2"))
    assert stopped.returncode == 1 and "non-finite steps in a row" in stopped.stderr
    assert "Traceback" not in stopped.stderr


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    args = _train_args(tmp_path, "term")
    args[args.index("trainer.max_steps=8")] = "trainer.max_steps=400"
    proc = subprocess.Popen([sys.executable, "-m", "sft_cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = tmp_path / "term" / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    steps = [int(p.name[5:]) for p in (tmp_path / "term" / "checkpoints").glob("step-*")]
    assert max(steps) >= 3 and max(steps) < 400


def test_compiled_decoder_layers_give_the_same_losses_and_gradients(tiny_dir, tiny_tokenizer):
    """trainer.compile: torch.compile of each decoder layer (inductor on CPU) changes no number
    beyond float32 rounding, over two optimizer steps of different sequence lengths."""
    from sft_cli.schedule import build_optimizer
    from sft_cli.train import _compile

    cfg = SFTConfig()
    cfg.model.name_or_path, cfg.model.dtype = str(tiny_dir("chatml")), "float32"
    cfg.peft.method = "none"
    tokenizer = tiny_tokenizer("chatml")
    collate = Collator(pad_id=0)
    steps = [[collate(packed_rows(2, len(tokenizer), seed=s))] for s in (0, 1)]
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg.trainer.compile = compiled
        model, _ = load_model(cfg, tokenizer, cfg.model.name_or_path)
        _compile(model, cfg)
        optimizer = build_optimizer(model, cfg.optim)
        losses = []
        for batches in steps:
            targets = sum(b["num_targets"] for b in batches)
            losses.append(accumulate_gradients(SFTModel(model), batches, targets).item() / targets)
            optimizer.step()
            optimizer.zero_grad()
        results[compiled] = (losses, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
