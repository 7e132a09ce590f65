"""Tokenizer and chat template for a run: the tokenizer's own template, a built-in
one (chatml, llama3, zephyr), or a user's .jinja file.

A built-in template whose markers the tokenizer lacks (e.g. ChatML's `<|im_start|>`
on a Llama tokenizer) gets them added as special tokens, so each marker is one
token; `train` then grows the embeddings to match. The prepared tokenizer is saved
in `run_dir/prepared/tokenizer` so every later stage uses exactly this one.

    tok = load_tokenizer("builtin:tiny-llama-chatml", chat_template="llama3")
"""

from __future__ import annotations

from pathlib import Path

from sft_cli.errors import ConfigError, load_error

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
# Markers a built-in template writes that must be single special tokens.
BUILTIN_MARKERS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "zephyr": [],  # Zephyr's role tags are plain text; its turns end with eos_token.
}


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def _read_template(choice: str) -> tuple[str, list[str]]:
    if choice in builtin_templates():
        return (TEMPLATE_DIR / f"{choice}.jinja").read_text(), BUILTIN_MARKERS.get(choice, [])
    path = Path(choice)
    if path.is_file():
        return path.read_text(), []
    raise ConfigError("data.chat_template", f"'{choice}' is neither a built-in template nor a file",
                      f"use null (the tokenizer's own), one of {', '.join(builtin_templates())}, "
                      "or a path to a .jinja file")


def load_tokenizer(name_or_path: str, chat_template: str | None = None, trust_remote_code: bool = False,
                   revision: str | None = None):
    """A fast tokenizer with the run's chat template set (None when there is none to set)."""
    from transformers import AutoTokenizer

    from sft_cli.assets import resolve_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code,
                                                  revision=revision)
    except (OSError, ValueError) as exc:
        raise load_error(f"the tokenizer '{name_or_path}'", exc,
                         "Offline? Set model.name_or_path (or model.tokenizer) to a local model folder.") from None
    if not tokenizer.is_fast:
        raise ConfigError("model.tokenizer", f"'{name_or_path}' has no fast (Rust) tokenizer",
                          "use a model with tokenizer.json; loss masks need character offsets")
    if isinstance(tokenizer.chat_template, dict):  # several named templates: the default one trains
        tokenizer.chat_template = tokenizer.chat_template.get("default")
    if chat_template is not None:
        text, markers = _read_template(chat_template)
        missing = [m for m in markers if m not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        tokenizer.chat_template = text
    return tokenizer


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token, including added ones (end-of-turn markers live there)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids


def special_tokens(tokenizer) -> set[str]:
    """The same tokens as `special_token_ids`, as the text that spells them."""
    return {token for token in tokenizer.convert_ids_to_tokens(sorted(special_token_ids(tokenizer))) if token}
