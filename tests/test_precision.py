"""Mixed precision: float32 masters keep lr 1e-5 updates that pure bf16 rounds away; the attention
backend and the stored dtypes follow model.dtype; float16 runs with a gradient scaler."""

import sys
import types

import pytest
import torch

from sft_cli.config import SFTConfig
from sft_cli.data.collate import Collator
from sft_cli.model import SFTModel, load_model, pick_attention
from sft_cli.precision import Precision
from sft_cli.schedule import build_optimizer
from sft_cli.train import accumulate_gradients
from tests.test_train import packed_rows


def _config(tiny_dir, dtype: str, peft: str = "none") -> SFTConfig:
    cfg = SFTConfig()
    cfg.model.name_or_path = str(tiny_dir("chatml"))
    cfg.model.dtype = dtype
    cfg.peft.method, cfg.peft.dropout = peft, 0.0
    cfg.optim.lr = 1e-5
    return cfg


def _one_step(cfg, tokenizer, precision: Precision, pure_bf16: bool = False) -> dict:
    """Weights before and after one AdamW step at lr 1e-5 on the same batch."""
    torch.manual_seed(0)
    model, _ = load_model(cfg, tokenizer, cfg.model.name_or_path)
    if pure_bf16:
        model.to(torch.bfloat16)  # what the trainer did before: bf16 weights and bf16 AdamW state
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, cfg.optim)
    batches = [Collator(pad_id=0)(packed_rows(4, len(tokenizer)))]
    accumulate_gradients(SFTModel(model), batches, batches[0]["num_targets"], precision)
    precision.unscale(optimizer)
    precision.step(optimizer)
    after = {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}
    return {n: after[n] != before[n] for n in before} | {"_dtypes": {p.dtype for p in model.parameters()}}


def _kept(changed: dict, reference: dict) -> float:
    """Of the weights a float32 step changes, the fraction this step changed too."""
    hits = sum(int((changed[n] & reference[n]).sum()) for n in reference if n != "_dtypes")
    return hits / sum(int(reference[n].sum()) for n in reference if n != "_dtypes")


def test_bf16_autocast_with_float32_masters_keeps_small_updates(tiny_dir, tiny_tokenizer):
    tokenizer = tiny_tokenizer("chatml")
    reference = _one_step(_config(tiny_dir, "float32"), tokenizer, Precision(torch.float32))
    mixed_cfg = _config(tiny_dir, "bfloat16")
    mixed = _one_step(mixed_cfg, tokenizer, Precision(torch.bfloat16))
    pure = _one_step(mixed_cfg, tokenizer, Precision(torch.bfloat16), pure_bf16=True)
    assert mixed["_dtypes"] == {torch.float32}  # full fine-tuning: every weight is a float32 master
    kept_mixed, kept_pure = _kept(mixed, reference), _kept(pure, reference)
    print(f"lr 1e-5, weights a float32 step changes that also change: bf16 autocast + float32 masters "
          f"{kept_mixed:.4f}, pure bf16 {kept_pure:.4f}")
    assert kept_mixed >= 0.99
    assert kept_pure < 0.5  # negative control: bf16 weights round most 1e-5 updates away


def test_lora_keeps_the_frozen_base_in_the_compute_dtype(tiny_dir, tiny_tokenizer):
    cfg = _config(tiny_dir, "bfloat16", peft="lora")
    model, info = load_model(cfg, tiny_tokenizer("chatml"), cfg.model.name_or_path)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    assert info["dtype"] == "bfloat16" and info["trainable_dtype"] == "float32"


def test_float16_scales_the_loss_and_skips_overflowed_steps(tiny_dir, tiny_tokenizer):
    cfg = _config(tiny_dir, "float16")
    tokenizer = tiny_tokenizer("chatml")
    precision = Precision.of("float16", torch.device("cpu"))
    assert precision.scaler is not None and precision.scaler.get_scale() == 65536.0
    torch.manual_seed(0)
    model, _ = load_model(cfg, tokenizer, cfg.model.name_or_path)
    optimizer = build_optimizer(model, cfg.optim)
    batch = Collator(pad_id=0)(packed_rows(2, len(tokenizer)))
    accumulate_gradients(SFTModel(model), [batch], batch["num_targets"], precision)
    grad = next(p.grad for p in model.parameters() if p.grad is not None).clone()
    precision.unscale(optimizer)  # the backward ran on loss x 65536; unscaling restores true gradients
    torch.testing.assert_close(next(p.grad for p in model.parameters() if p.grad is not None), grad / 65536.0)
    precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    accumulate_gradients(SFTModel(model), [batch], batch["num_targets"], precision)
    next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("inf"))  # an overflow in backward
    before = [p.detach().clone() for p in model.parameters()]
    precision.unscale(optimizer)
    precision.step(optimizer)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # skipped
    assert precision.scaler.get_scale() == 32768.0  # and the scale came down


def test_auto_attention_picks_flash_only_for_half_precision_on_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert pick_attention("auto", dtype=torch.bfloat16) == "flash_attention_2"
    assert pick_attention("auto", dtype=torch.float16) == "flash_attention_2"
    assert pick_attention("auto", dtype=torch.float32) == "sdpa"  # flash has no float32 kernels
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # a T4: no flash-attn 2
    assert pick_attention("auto", dtype=torch.float16) == "sdpa"
    from sft_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="model.attn_implementation"):
        pick_attention("flash_attention_2", dtype=torch.float32)


def test_float32_on_gpu_turns_on_tf32():
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        precision = Precision.of("float32", torch.device("cuda"))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and not precision.mixed
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def test_float16_training_survives_overflowed_steps(tmp_path, sft, monkeypatch):
    """Through the CLI: steps 2 and 3 get non-finite gradients (fault injection, after backward, as
    an fp16 overflow would); the scaler skips them and halves its scale, and training goes on."""
    import json

    from tests.conftest import write_chat_jsonl

    data = write_chat_jsonl(tmp_path / "chat.jsonl", rows=40, max_words=20)
    args = ["train", "model.name_or_path=builtin:tiny-llama-chatml", f"data.sources=[{{path: {data}}}]",
            "max_seq_len=128", f"run_dir={tmp_path / 'run'}", "trainer.micro_batch_size=2", "trainer.max_steps=5",
            "model.dtype=float16", "peft=none", "trainer.max_bad_steps=0"]
    monkeypatch.setenv("SFT_FAULT_NAN_STEPS", "2,3")
    result = sft(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss scale now 32768" in result.stderr and "loss scale now 16384" in result.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(map(lambda r: r["loss"] == r["loss"], records))  # finite losses throughout
