"""Training checkpoints: `run_dir/checkpoints/step-N/`, written atomically, manifest last.

    step-N/
      trainable.safetensors          LoRA weights (+ modules_to_save) or every weight    } one process
      optimizer.pt  scheduler.pt     optimizer and lr-schedule state                     } or DDP
      dcp/                           FSDP2: model + optimizer shards (torch.distributed.checkpoint)
      rng-rank{R}.pt                 python, numpy, torch (+cuda) RNG states of each rank
      trainer_state.json             step, token counters, bad-step streak, world size
      config.yaml                    the resolved config of the run
      manifest.json                  written last: fingerprints of data and config; "complete"

Every rank writes into `.step-N.tmp/` (its RNG state, its FSDP shards); rank 0 writes the
rest, the manifest last, and renames the folder into place. A crash at any point leaves no
`step-N/` that looks whole. Everything is loaded with `torch.load(weights_only=True)` or
safetensors: a checkpoint cannot run code.

    save_checkpoint(run_dir, step, model, engine, optimizer, scheduler, state, cfg, fingerprints, keep_last)
    latest = latest_checkpoint(run_dir)   # newest complete step-N, or None
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from sft_cli.artifacts import atomic_dir, is_complete, read_manifest, write_json_atomic, write_manifest
from sft_cli.config import SFTConfig, to_yaml
from sft_cli.distributed import barrier, is_fsdp, world
from sft_cli.errors import SFTError
from sft_cli.model import unwrap

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    """Every RNG as plain tensors and numbers (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Only what training changes: the LoRA weights (and modules_to_save), or everything."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise SFTError(f"checkpoint has weights the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def _sharded_state(engine, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(engine, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optim": optim_state}


def save_checkpoint(run_dir: Path, step: int, model, engine, optimizer, scheduler, state: dict, cfg: SFTConfig,
                    fingerprints: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. `model` is the bare (peft) model, `engine` what trains it."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    w = world()
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    tmp = final.parent / f".step-{step}.tmp"
    if w.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash mid-save
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{w.rank}.pt")
    if is_fsdp(engine):
        dcp.save(_sharded_state(engine, optimizer), checkpoint_id=str(tmp / "dcp"))
    elif w.is_main:  # DDP replicas are identical: one copy is enough
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if w.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json_atomic(tmp / "trainer_state.json", {**state, "world_size": w.world_size})
        (tmp / "config.yaml").write_text(to_yaml(cfg))
    barrier()
    if w.is_main:
        write_manifest(tmp, fingerprints["run"], {"stage": "checkpoint", "step": step, **fingerprints})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(run_dir, keep_last)
    barrier()
    return final


def load_checkpoint(folder: Path, model, engine, optimizer, scheduler) -> dict:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    w = world()
    state = json.loads((folder / "trainer_state.json").read_text())
    saved_world = state.get("world_size", 1)
    if saved_world != w.world_size:
        raise SFTError(f"{folder} was written by {saved_world} process(es), this run has {w.world_size}: "
                       f"resume with trainer.nproc x trainer.nnodes = {saved_world}, or start over with "
                       "trainer.resume=never")
    if is_fsdp(engine):
        shards = _sharded_state(engine, optimizer)
        dcp.load(shards, checkpoint_id=str(folder / "dcp"))
        set_state_dict(engine, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optim"],
                       options=StateDictOptions(ignore_frozen_params=True))
    else:
        load_trainable_state(model, load_file(str(folder / "trainable.safetensors")))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(folder / f"rng-rank{w.rank}.pt", weights_only=True))
    return state


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


def save_final(run_dir: Path, model, engine, tokenizer, stop_token_ids: list[int]) -> Path:
    """`final/`: loads with AutoModelForCausalLM (full) or PeftModel (LoRA), tokenizer beside it.
    Collective under FSDP2 (the full weights are gathered to rank 0 first)."""
    state_dict = None
    if is_fsdp(engine):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(engine, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state_dict = {name.removeprefix("model."): tensor for name, tensor in full.items()}
    out = Path(run_dir) / "final"
    if world().is_main:
        with atomic_dir(out) as tmp:
            model.save_pretrained(str(tmp), state_dict=state_dict)
            tokenizer.save_pretrained(str(tmp))
            generation = unwrap(model).generation_config
            # Stop on EOS and on whatever closes an assistant turn in this template (e.g. <|im_end|>).
            generation.eos_token_id = sorted(set(stop_token_ids) | ({tokenizer.eos_token_id} - {None}))
            generation.pad_token_id = tokenizer.pad_token_id
            generation.save_pretrained(str(tmp))
            write_manifest(tmp, "final", {"stage": "final", "peft": hasattr(model, "peft_config")})
    barrier()
    return out
