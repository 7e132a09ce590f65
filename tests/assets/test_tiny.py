"""The tiny test models: reproducible, hermetic, and as quirky as the real tokenizers they imitate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from sft_cli.assets.tiny import FAMILIES, build_model, build_tokenizer, tiny_model_dir
from sft_cli.errors import ConfigError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
    "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n",
}
# Plain text the BPE never saw: accents, CJK, emoji (incl. a ZWJ sequence), code, odd whitespace.
UNSEEN = "Grüße, naïve café! 你好，世界 🤗👩‍💻 ∑x² → ∞\n\tdef f(x): return {'k': x}  # ok\r\n  end"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sft-cache")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tokenizer_build_is_bitwise_deterministic(tmp_path):
    a = build_tokenizer(tmp_path / "a", template="llama3")
    b = build_tokenizer(tmp_path / "b", template="llama3")
    assert _files(a) == _files(b)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(_files(a))


def test_model_build_is_bitwise_deterministic_and_keeps_callers_rng(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    rng = torch.get_rng_state()
    a, b = build_model(tmp_path / "a", tok, seed=0), build_model(tmp_path / "b", tok, seed=0)
    c = build_model(tmp_path / "c", tok, seed=1)
    assert torch.equal(rng, torch.get_rng_state())
    assert _files(a) == _files(b)
    assert _files(a)["model.safetensors"] != _files(c)["model.safetensors"]


@pytest.mark.slow
def test_cli_build_matches_in_process_build(tmp_path):
    # A fresh interpreter has fresh hash seeds (Python and Rust): catches order-dependent training.
    out = subprocess.run([sys.executable, "-m", "sft_cli.assets.tiny", str(tmp_path / "cli"), "--template", "zephyr",
                          "--arch", "qwen2"], capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == tmp_path / "cli"
    here = build_model(tmp_path / "here", build_tokenizer(tmp_path / "here", template="zephyr"), arch="qwen2")
    assert _files(tmp_path / "cli") == _files(here)


@pytest.mark.parametrize("template", list(FAMILIES))
def test_any_text_round_trips_without_unknown_tokens(cache, template):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir(template, cache_dir=cache))
    ids = tok(UNSEEN, add_special_tokens=False).input_ids
    assert tok.unk_token_id is None
    assert tok.decode(ids) == UNSEEN
    assert len(tok) == 512 and max(ids) < len(tok)


@pytest.mark.parametrize("template,tokens", [
    ("chatml", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    ("llama3", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("zephyr", ["<s>", "</s>"]),
])
def test_special_tokens_are_single_ids(cache, template, tokens):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir(template, cache_dir=cache))
    for token in tokens:
        assert tok(token, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(token)], token


def test_zephyr_role_markers_are_plain_text(cache):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("zephyr", cache_dir=cache))
    for marker in ["<|user|>", "<|assistant|>", "<|system|>"]:
        ids = tok(marker, add_special_tokens=False).input_ids
        assert len(ids) > 1 and tok.decode(ids) == marker
        assert marker not in tok.get_vocab()


@pytest.mark.parametrize("template", ["chatml", "llama3", "zephyr"])
def test_chat_template_renders_and_tokenizes(cache, template):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir(template, cache_dir=cache))
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == EXPECTED[template]
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids) == text  # one BOS at most: apply_chat_template adds no special tokens
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)


def test_none_family_has_no_chat_template(cache):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("none", cache_dir=cache))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template(CHAT, tokenize=False)


def test_bos_is_added_by_the_tokenizer_for_llama3_and_zephyr_only(cache):
    llama3 = AutoTokenizer.from_pretrained(tiny_model_dir("llama3", cache_dir=cache))
    bos = llama3.bos_token_id
    assert llama3("hi").input_ids[0] == bos
    assert bos not in llama3("hi", add_special_tokens=False).input_ids
    # The realistic trap: the template writes BOS too, so re-tokenizing its text doubles it.
    assert llama3(llama3.apply_chat_template(CHAT, tokenize=False)).input_ids[:2] == [bos, bos]
    zephyr = AutoTokenizer.from_pretrained(tiny_model_dir("zephyr", cache_dir=cache))
    assert zephyr("hi").input_ids[0] == zephyr.bos_token_id
    chatml = AutoTokenizer.from_pretrained(tiny_model_dir("chatml", cache_dir=cache))
    assert chatml.bos_token is None
    assert chatml("hi").input_ids == chatml("hi", add_special_tokens=False).input_ids


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("mistral", False), ("gemma", True)])
def test_model_folder_loads_and_runs(cache, arch, tied):
    path = tiny_model_dir("llama3", arch, cache_dir=cache)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    # transformers 5 loads qwen2 folders with Qwen2Tokenizer, which rebuilds the pipeline: same ids required.
    raw = PreTrainedTokenizerFast.from_pretrained(path)
    assert tok(UNSEEN, return_offsets_mapping=True).data == raw(UNSEEN, return_offsets_mapping=True).data
    assert len(tok) == model.config.vocab_size
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings is tied
    ids = tok.apply_chat_template(CHAT, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_cache_builds_once_then_returns_fast(tmp_path, monkeypatch):
    """Fast = a cache hit: the second call builds nothing and rewrites nothing (not a wall-clock bound,
    which a busy machine breaks)."""
    from sft_cli.assets import tiny

    first = tiny_model_dir("chatml", "qwen2", cache_dir=tmp_path)
    written = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached model was built again")

    monkeypatch.setattr(tiny, "build_tokenizer", no_rebuild)
    monkeypatch.setattr(tiny, "build_model", no_rebuild)
    again = tiny_model_dir("chatml", "qwen2", cache_dir=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == written
    monkeypatch.undo()
    assert again == first and first.name.startswith("tiny-qwen2-chatml-")
    assert (first / ".complete").exists() and (first / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left behind
    assert tiny_model_dir("chatml", "qwen2", cache_dir=tmp_path, seed=1) != first


def test_cache_dir_defaults_to_sft_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE", str(tmp_path))
    assert tiny_model_dir("zephyr", "llama").parent == tmp_path


def test_unknown_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="template 'alpaca'"):
        tiny_model_dir("alpaca", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="arch 'gpt2'"):
        tiny_model_dir("chatml", "gpt2", cache_dir=tmp_path)
