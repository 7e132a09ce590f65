"""Tiny, deterministic models for hermetic tests and benchmarks: no downloads, built in ~1 s.

A byte-level BPE tokenizer (512 tokens, trained on a built-in English + Python corpus)
with one chat template family's special tokens, and a 2-layer random-init causal LM
saved next to it, so the folder loads like any Hugging Face model:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sft_cli.assets.tiny import tiny_model_dir

    path = tiny_model_dir(template="llama3", arch="qwen2")  # built once, then cached
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
    logits = model(**batch).logits  # (1, T, 512)

    python -m sft_cli.assets.tiny /tmp/tiny --template zephyr --arch llama

Template families copy the quirks of the real tokenizers, since those are what a
trainer gets wrong:
    chatml  (Qwen)      no BOS; eos <|im_end|>, pad <|endoftext|>; markers are special tokens
    llama3  (Llama 3)   the tokenizer itself adds <|begin_of_text|> AND the template writes it
                        (the classic doubled BOS); eos <|eot_id|>
    zephyr  (Zephyr)    the tokenizer adds <s>; eos </s>; <|user|> etc. are plain text, so
                        each role marker is several BPE tokens
    none                chatml's tokens but no chat template (the "no template" error path)

All families share Qwen2's NFC normalizer and pre-tokenizer (see build_tokenizer), so text
decodes to its NFC form. Builds are bit-for-bit reproducible: same arguments, same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"

# Per family: (bos, eos, pad, extra special tokens, the tokenizer adds BOS itself).
FAMILIES = {
    "chatml": (None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>", "<|im_end|>"], False),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"], True),
    "zephyr": ("<s>", "</s>", "</s>", [], True),  # no extras: Zephyr's role markers are plain text
    "none": (None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>", "<|im_end|>"], False),
}
# Ties matter: llama keeps a separate lm_head, the others tie it to the embeddings, so both
# code paths (e.g. resizing embeddings after adding tokens) get exercised.
ARCHS = {
    "llama": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    "mistral": {"tie_word_embeddings": False},
    "gemma": {"tie_word_embeddings": True},
}
MAX_LEN = 4096
# Qwen2's pre-tokenizer split (GPT-4's, but one digit per piece).
SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# What save_pretrained writes for a tokenizer (v4 also writes special_tokens_map.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _check(template: str | None = None, arch: str | None = None) -> None:
    from sft_cli.errors import ConfigError

    if template is not None and template not in FAMILIES:
        raise ConfigError("model.name_or_path", f"no tiny tokenizer for template '{template}'",
                          f"use one of {', '.join(FAMILIES)}, e.g. builtin:tiny-llama-chatml")
    if arch is not None and arch not in ARCHS:
        raise ConfigError("model.name_or_path", f"no tiny model for arch '{arch}'",
                          f"use one of {', '.join(ARCHS)}, e.g. builtin:tiny-qwen2-chatml")


def corpus() -> list[str]:
    """A fixed training text: templated English sentences and Python lines (seeded, so stable)."""
    rng = random.Random(1234)
    subjects = ["the model", "a student", "the teacher", "my friend", "the robot", "our team", "the cat",
                "a developer", "the assistant", "this user", "the system", "every agent"]
    verbs = ["reads", "writes", "explains", "answers", "learns", "builds", "tests", "finds", "trains",
             "computes", "checks", "returns", "loads", "saves", "prints", "sorts"]
    objects = ["the question", "a short story", "the data", "an answer", "the code", "three numbers",
               "the weights", "a long list", "the tokens", "some text", "the loss", "each batch"]
    tails = ["today.", "very quickly.", "with care.", "in the morning.", "before lunch.", "again and again.",
             "for 42 minutes.", "at 3:15 pm.", "without help!", "step by step.", "in 2024?", "(mostly)."]
    lines = [f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}"
             for _ in range(400)]
    lines += [f"Q: What is {a} + {b}? A: {a + b}." for a, b in ((rng.randint(0, 99), rng.randint(0, 99))
                                                              for _ in range(60))]
    names = ["total", "count", "value", "items", "result", "index", "text", "tokens", "batch", "loss"]
    for _ in range(80):
        a, b = rng.sample(names, 2)
        lines += [f"def get_{a}({b}, n=0):", f"    {a} = [x * 2 for x in {b} if x > n]",
                  f"    return {{'{a}': len({a}), \"{b}\": {b}[-1]}}  # {a} of {b}",
                  f"print(get_{a}({rng.randint(0, 9)}) == None)"]
    return lines


def build_tokenizer(out_dir: Path, template: str = "chatml", vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer for one template family and save it to `out_dir`."""
    import tokenizers as tk
    from transformers import PreTrainedTokenizerFast

    _check(template)
    bos, eos, pad, extras, adds_bos = FAMILIES[template]
    specials = list(dict.fromkeys(t for t in [bos, eos, pad, *extras] if t))
    tok = tk.Tokenizer(tk.models.BPE())
    # Qwen2's exact pipeline: transformers 5 loads any qwen2 model folder with Qwen2Tokenizer,
    # which rebuilds the normalizer and pre-tokenizer; matching it keeps ids the same whatever
    # class loads the folder. Byte level over all 256 bytes: any text encodes, no <unk>.
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(SPLIT_REGEX), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    # trim_offsets=False keeps a token's leading space inside its offsets (as Qwen and Llama 3
    # do), so loss masks built from character offsets line up with the text exactly.
    byte_level = tk.processors.ByteLevel(trim_offsets=False)
    if adds_bos:  # what Llama 3 / Mistral ship: BOS is added on every encode with special tokens
        tok.post_processor = tk.processors.Sequence([byte_level, tk.processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = byte_level
    # A post-processor already set makes transformers keep it rather than rebuild one.
    # `additional_special_tokens` (not v5's `extra_special_tokens`) works in 4.x and 5.x alike.
    # unk_token=None is written out explicitly: left unset, Qwen2Tokenizer defaults it to
    # <|endoftext|> and appends that as a new token past the model's vocab_size.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=None, additional_special_tokens=extras, model_max_length=MAX_LEN)
    if template != "none":
        fast.chat_template = (TEMPLATE_DIR / f"{template}.jinja").read_text()
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def build_model(out_dir: Path, tokenizer_dir: Path, arch: str = "llama", hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                seed: int = 0) -> Path:
    """Save a random-init causal LM (float32 safetensors) plus the tokenizer into `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _check(arch=arch)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=MAX_LEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **ARCHS[arch])
    with torch.random.fork_rng(devices=[]):  # seed our init without moving the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # v5 draws a "Writing model shards" bar even for one tiny file
    try:
        model.save_pretrained(out_dir)
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()
    # Copy the tokenizer's files rather than re-save the loaded one: a reloaded tokenizer
    # writes load-time keys (`is_local`, ...) into its config; a copy stays byte-identical.
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists() and src.resolve() != (out_dir / name).resolve():
            shutil.copyfile(src, out_dir / name)
    return out_dir


def _default_cache() -> Path:
    return Path(os.environ.get("SFT_CACHE") or Path.home() / ".cache" / "sft")


def _build_key(template: str, arch: str, model_kwargs: dict) -> str:
    """Changes when anything that shapes the output does: arguments, this code, the template, libraries."""
    parts = {"args": [template, arch, sorted(model_kwargs.items())],
             "code": Path(__file__).read_text(),
             "template": (TEMPLATE_DIR / f"{template}.jinja").read_text() if template != "none" else "",
             "libs": [metadata.version(p) for p in ("torch", "transformers", "tokenizers")]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def tiny_model_dir(template: str = "chatml", arch: str = "llama", cache_dir: Path | None = None,
                   **model_kwargs) -> Path:
    """The cached model folder for these arguments, built on first use (`build_model` kwargs pass through)."""
    _check(template, arch)
    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache()
    final = cache_dir / f"tiny-{arch}-{template}-{_build_key(template, arch, model_kwargs)}"
    if (final / ".complete").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build in a private temp dir and rename it into place, so a crash or a concurrent
    # build never leaves a half-written folder under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        build_tokenizer(tmp, template=template)
        build_model(tmp, tmp, arch=arch, **model_kwargs)
        (tmp / ".complete").touch()  # written last: its presence means the folder is whole
        if final.exists() and not (final / ".complete").exists():
            shutil.rmtree(final)  # no marker: not ours to trust (half-deleted, copied by hand)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its folder is identical
            if not (final / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sft_cli.assets.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--template", default="chatml", choices=list(FAMILIES))
    parser.add_argument("--arch", default="llama", choices=list(ARCHS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tokenizer(args.out_dir, template=args.template)
    print(build_model(args.out_dir, args.out_dir, arch=args.arch, seed=args.seed))


if __name__ == "__main__":
    main()
