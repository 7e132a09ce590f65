"""Training checkpoints: `run_dir/checkpoints/step-N/`, written atomically, manifest last.

    step-N/
      adapter/ or model.safetensors   LoRA adapter (peft) or every trainable weight
      optimizer.pt  scheduler.pt     optimizer and lr-schedule state
      rng-rank{R}.pt                 python, numpy, torch (+cuda) RNG states of each rank
      trainer_state.json             step, epoch position, token counters, bad-step streak
      config.yaml                    the resolved config of the run
      manifest.json                  written last: fingerprints of data and config; "complete"

    save_checkpoint(run_dir, step, model, optimizer, scheduler, state, cfg, fingerprints)
    latest = latest_checkpoint(run_dir)   # newest complete step-N, or None
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from sft_cli.artifacts import atomic_dir, is_complete, read_manifest, write_json_atomic, write_manifest
from sft_cli.config import SFTConfig, to_yaml
from sft_cli.model import unwrap

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Only what training changes: the LoRA weights (and modules_to_save), or everything."""
    return {name: p.detach().cpu().clone() for name, p in _named_params(model) if p.requires_grad}


def _named_params(model):
    return getattr(model, "module", model).named_parameters()


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(_named_params(model))
    missing = [name for name in state if name not in params]
    if missing:
        raise RuntimeError(f"checkpoint has weights the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, cfg: SFTConfig,
                    fingerprints: dict, keep_last: int) -> Path:
    """Rank 0 writes everything but the RNG states, which every rank writes for itself (see train)."""
    from safetensors.torch import save_file

    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    with atomic_dir(final) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng-rank0.pt")
        write_json_atomic(tmp / "trainer_state.json", state)
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        write_manifest(tmp, fingerprints["run"], {"stage": "checkpoint", "step": step, **fingerprints})
    prune(run_dir, keep_last)
    return final


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    load_trainable_state(model, load_file(str(folder / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(folder / "rng-rank0.pt", weights_only=False))
    return json.loads((folder / "trainer_state.json").read_text())


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Half-written ones (no manifest) are ignored."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for folder in root.glob("step-*") if root.exists() else []:
        match = STEP_DIR.match(folder.name)
        if match and is_complete(folder):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def prune(run_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, folder in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)


def checkpoint_manifest(folder: Path) -> dict:
    return read_manifest(folder) or {}


def save_final(run_dir: Path, model, tokenizer, stop_token_ids: list[int]) -> Path:
    """`final/`: loads with AutoModelForCausalLM (full) or PeftModel (LoRA), tokenizer beside it."""
    out = Path(run_dir) / "final"
    inner = getattr(model, "module", model)
    with atomic_dir(out) as tmp:
        inner.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        base = unwrap(model)
        generation = base.generation_config
        # Stop on EOS and on whatever closes an assistant turn in this template (e.g. <|im_end|>).
        generation.eos_token_id = sorted(set(stop_token_ids) | ({tokenizer.eos_token_id} - {None}))
        generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(str(tmp))
        write_manifest(tmp, "final", {"stage": "final", "peft": hasattr(inner, "peft_config")})
    return out
