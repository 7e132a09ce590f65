"""Training checkpoints: `run_dir/checkpoints/step-N/`, written atomically, manifest last.

    step-N/
      trainable.safetensors          LoRA weights (+ modules_to_save) or every weight    } one process
      optimizer.pt  scheduler.pt     optimizer and lr-schedule state                     } or DDP
      dcp/                           FSDP2: model + optimizer shards (torch.distributed.checkpoint)
      rng-rank{R}.pt                 python, numpy, torch (+ its own GPU's) RNG states of each rank
      trainer_state.json             step, token counters, bad-step streak, world size (informational)
      config.yaml                    the resolved config of the run
      manifest.json                  written last: fingerprints of data and config, the sha256 of
                                     every file above; its presence means "complete"

Every rank writes into `.step-N.tmp/` (its RNG state, its FSDP shards); rank 0 writes the
rest, the manifest last, and renames the folder into place. A crash at any point leaves no
`step-N/` that looks whole; a full disk leaves the previous checkpoint as it was. On resume a
checkpoint whose files fail their checksums (bit rot, a truncated copy) is refused with a message
and the one before it is used. Hashing is shared: every rank hashes a byte-balanced share of the
files (`hash_shares`), at save and on resume, and every rank sees every digest, so all agree on
which checkpoint to load. Everything is loaded onto the CPU with `torch.load(weights_only=True)`
or safetensors: a checkpoint cannot run code, and loads on any number and kind of devices (the
world size may differ from the one that saved it; train.py's run identity decides what resumes).

    save_checkpoint(run_dir, step, model, parallel_model, optimizer, scheduler, state, cfg, fingerprints, keep_last)
    resume_from = resumable_checkpoint(run_dir)   # newest complete step-N whose files verify, or None
"""

from __future__ import annotations

import errno
import heapq
import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sft_cli import console as ui
from sft_cli.config import SFTConfig, to_yaml
from sft_cli.distributed import barrier, device, is_fsdp, world
from sft_cli.errors import SFTError
from sft_cli.faults import fault_point
from sft_cli.model import unwrap
from sft_cli.run_dir import (
    MANIFEST,
    atomic_dir,
    hash_file,
    is_complete,
    read_manifest,
    swap_into_place,
    write_json_atomic,
    write_manifest,
)

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    """Every RNG of this rank as plain tensors and numbers (loadable with weights_only=True).
    Only this rank's own GPU: a state per visible GPU would not load where fewer are visible."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(device())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], device())  # rank R's state onto rank R's GPU


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


def _sharded_state(parallel_model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(parallel_model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optim": optim_state}


def save_checkpoint(run_dir: Path, step: int, model, parallel_model, optimizer, scheduler, state: dict, cfg: SFTConfig,
                    fingerprints: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. `model` is the bare (peft) model, `parallel_model` what trains it."""
    w = world()
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    tmp = final.parent / f".step-{step}.tmp"
    if w.is_main:
        for leftover in final.parent.glob(".step-*.tmp"):  # a crash mid-save left it: never read
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        _write_checkpoint_files(tmp, step, model, parallel_model, optimizer, scheduler, state, cfg)
        barrier()  # every rank's files are written: now they can be hashed
        files = file_checksums(tmp)
        if w.is_main:
            write_manifest(tmp, fingerprints["run"], {"stage": "checkpoint", "step": step, **fingerprints,
                                                      "files": files})
    except OSError as exc:  # disk full, quota, read-only filesystem: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise SFTError(f"cannot write checkpoint step-{step} in {final.parent}: {exc.strerror or exc} "
                       f"({exc.filename or 'no file name'}). Nothing was replaced: "
                       f"{previous or 'no earlier checkpoint'} is intact. Free space, then re-run the same "
                       "command to resume from it.") from None
    if w.is_main:
        swap_into_place(tmp, final)  # a step re-saved after a resume replaces its old copy
        prune(run_dir, keep_last)
    barrier()
    return final


def _write_checkpoint_files(tmp: Path, step: int, model, parallel_model, optimizer, scheduler, state, cfg) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    w = world()
    torch.save(rng_state(), tmp / f"rng-rank{w.rank}.pt")
    if is_fsdp(parallel_model):
        dcp.save(_sharded_state(parallel_model, optimizer), checkpoint_id=str(tmp / "dcp"))
    elif w.is_main:  # DDP replicas are identical: one copy is enough
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    fault_point("checkpoint", step)  # reliability tests: killed or out of space with the weights half written
    if w.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json_atomic(tmp / "trainer_state.json", {**state, "world_size": w.world_size})
        (tmp / "config.yaml").write_text(to_yaml(cfg))


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def _from_main(value):
    """Rank 0's `value` on every rank. Whatever decides a collective's shape (which files, which
    checkpoints) comes from one reader, so ranks cannot disagree over a directory listing."""
    if not _joined():
        return value
    box = [value if world().is_main else None]
    dist.broadcast_object_list(box, src=0)  # pickled through a tensor: gloo and nccl alike
    return box[0]


def _from_every_rank(value) -> list:
    if not _joined():
        return [value]
    gathered = [None] * world().world_size
    dist.all_gather_object(gathered, value)
    return gathered


def hash_shares(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Deal files to ranks, balanced by bytes: largest first, each to the rank with the fewest
    bytes so far (no share exceeds another by more than the largest file). Pure and deterministic.

    >>> hash_shares({"a": 5, "b": 4, "c": 3, "d": 1}, 2)
    [['a', 'd'], ['b', 'c']]
    """
    shares = [[] for _ in range(world_size)]
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (bytes so far, rank)
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(name)
        heapq.heappush(loads, (load + sizes[name], rank))
    return shares


def _digest(path: Path) -> str | None:
    """sha256 of a file, None when it is missing or unreadable (a verdict, never a crash: the other
    ranks are waiting for this one's answer in a collective)."""
    try:
        return hash_file(path)
    except OSError:
        return None


def shared_digests(folder: Path, names: list[str]) -> dict[str, str | None]:
    """sha256 of `names` (rank 0's list counts) under `folder`, every rank hashing its share;
    the merged result on every rank. In one process it hashes them all."""
    w = world()

    def size(name: str) -> int:
        path = Path(folder) / name
        return path.stat().st_size if path.is_file() else 0

    shares = _from_main(hash_shares({name: size(name) for name in names}, w.world_size) if w.is_main else None)
    merged = {}
    for part in _from_every_rank({name: _digest(Path(folder) / name) for name in shares[w.rank]}):
        merged.update(part)
    return merged


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the manifest, by relative path (collective)."""
    listing = sorted(Path(folder).rglob("*")) if world().is_main else []  # only rank 0's is used
    names = [str(p.relative_to(folder)) for p in listing if p.is_file() and p.name != MANIFEST]
    digests = shared_digests(folder, names)
    unreadable = sorted(name for name, digest in digests.items() if digest is None)
    if unreadable:  # every rank sees the same merged result, so every rank raises alike (no hang)
        raise OSError(errno.EIO, "cannot read back what was just written", str(Path(folder) / unreadable[0]))
    return dict(sorted(digests.items()))


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file the manifest lists is there with its recorded sha256, else the problem
    (collective, the same verdict on every rank). Checkpoints written before checksums were
    recorded have nothing to check and pass."""
    recorded = _from_main((read_manifest(folder) or {}).get("files") if world().is_main else None)
    if recorded is None:
        return None
    digests = shared_digests(folder, sorted(recorded))
    for name, digest in sorted(recorded.items()):
        if digests[name] is None:
            return f"{name} is missing or unreadable"
        if digests[name] != digest:
            return f"{name} does not match its recorded sha256"
    return None


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files verify; damaged ones are reported and skipped.
    Raises when checkpoints exist but none verifies (resuming from nothing would silently start over).
    Collective: every rank walks rank 0's list with the same verdicts, so all pick the same one."""
    found = _from_main(checkpoints(run_dir) if world().is_main else None)
    damaged = []
    for _, folder in reversed(found):
        problem = verify_checkpoint(folder)
        if problem is None:
            if damaged:
                ui.err.print(f"[yellow]resuming from the previous checkpoint {folder.name}[/]")
            return folder
        damaged.append(folder)
        ui.err.print(f"[bold yellow]refusing checkpoint {folder}[/]: {problem} (damaged or tampered with)")
    if damaged:
        raise SFTError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}: all {len(damaged)} fail their "
                       "checksums. Restore them, or start over with trainer.resume=never.")
    return None


def _load_tensors(path: Path):
    """torch.load that only accepts tensors and plain data; anything else is a clear refusal.
    Onto the CPU: tensors saved from cuda:0 would otherwise all land on GPU 0 of every rank (or fail
    without a GPU). Optimizer.load_state_dict moves each state to its parameter's device and dtype."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise SFTError(f"refusing to load {path}: not a plain tensor file ({str(exc).splitlines()[0][:200]}). "
                       "Checkpoints never run code on load; restore the file or use trainer.resume=never.") from None


def load_checkpoint(folder: Path, model, parallel_model, optimizer, scheduler) -> dict:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    w = world()
    # Any world size: plain files are one copy of everything, DCP reshards on load; whether the
    # step still means the same rows is train.py's run identity check, done before this. The
    # files, not this run's parallel_model, say how to read: parallel=auto picks FSDP2 for a big full
    # fine-tune on several GPUs but nothing on one, so a run may change format when it resumes.
    state = json.loads((folder / "trainer_state.json").read_text())
    if (folder / "dcp").is_dir():  # into FSDP2 shards, DDP replicas or one process alike
        shards = _sharded_state(parallel_model, optimizer)
        dcp.load(shards, checkpoint_id=str(folder / "dcp"))
        set_state_dict(parallel_model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optim"],
                       options=StateDictOptions(ignore_frozen_params=True))
    elif is_fsdp(parallel_model):
        _load_full_into_fsdp(folder, model, parallel_model, optimizer)
    else:
        load_trainable_state(model, load_file(str(folder / "trainable.safetensors")))
        optimizer.load_state_dict(_load_tensors(folder / "optimizer.pt"))
    scheduler.load_state_dict(_load_tensors(folder / "scheduler.pt"))
    rng_file = folder / f"rng-rank{w.rank}.pt"
    # Resumed on more processes than saved: this rank has no file and keeps its fresh generators.
    # Nothing is lost: train.py seeds torch from (seed, step, rank) before every step, and the
    # data order is StepPlan's, so dropout and NEFTune noise are those of the uninterrupted run.
    if rng_file.is_file():
        set_rng_state(_load_tensors(rng_file))
    return state


def _load_full_into_fsdp(folder: Path, model, parallel_model, optimizer) -> None:
    """Plain files (one process or DDP wrote them) into FSDP2: every rank reads the full tensors
    and keeps its shard. FSDP2 loads by parameter name; optimizer.pt numbers parameters by their
    position over the optimizer's param groups, which build_optimizer makes the same every run."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    name_in_parallel = {id(p): name for name, p in parallel_model.named_parameters()}
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise SFTError(f"checkpoint has weights the model lacks: {missing[:3]}")
    model_state = {name_in_parallel[id(params[name])]: tensor for name, tensor in weights.items()}
    saved = _load_tensors(folder / "optimizer.pt")
    by_position = [name_in_parallel[id(p)] for group in optimizer.param_groups for p in group["params"]]
    optim_state = {"state": {by_position[i]: value for i, value in saved["state"].items()},
                   "param_groups": [{**group, "params": [by_position[i] for i in group["params"]]}
                                    for group in saved["param_groups"]]}
    set_state_dict(parallel_model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))


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


def save_final(run_dir: Path, model, parallel_model, tokenizer, stop_token_ids: list[int]) -> Path:
    """`final/`: loads with AutoModelForCausalLM (full) or PeftModel (LoRA), tokenizer beside it.
    Collective under FSDP2 (the full weights are gathered to rank 0 first)."""
    state_dict = None
    if is_fsdp(parallel_model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(parallel_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
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
