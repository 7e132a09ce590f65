"""Process-group facts and collectives the trainer needs; all no-ops in a single process.

Workers are started by torchrun (see launch.py) or by the user's own outer torchrun; either
way the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) says who we are.

    with process_group():            # init from torchrun's env (nccl on GPU, gloo on CPU)
        info = world()               # rank, world_size, local_rank, is_main
        total = all_reduce_sum(n)
        parallel_model = wrap(SFTModel(model), parallel="ddp")
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(timeout_s: int = 1800):
    """Join the job torchrun started (if any) for the duration of the block. `timeout_s` bounds how
    long a collective waits for the slowest rank (NCCL's default, 10 minutes, is shorter than
    hashing or loading a large checkpoint)."""
    joined = launched_by_torchrun() and not dist.is_initialized()
    if joined:
        from datetime import timedelta

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        dist.init_process_group(backend, device_id=device() if backend == "nccl" else None,
                                timeout=timedelta(seconds=timeout_s))
    try:
        yield world()
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float | int) -> float:
    return float(all_reduce_sum_array(np.array([value], dtype=np.float64))[0])


def all_reduce_max(value: float | int) -> float:
    return float(_all_reduce(np.array([value], dtype=np.float64), "MAX")[0])


def all_reduce_sum_array(values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks, as float64 (one collective for a whole vector of totals)."""
    return _all_reduce(np.asarray(values, dtype=np.float64), "SUM")


def _all_reduce(values: np.ndarray, op: str) -> np.ndarray:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.from_numpy(values.copy()).to(collective_device())
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.cpu().numpy()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: ranks agree on stopping at the same step."""
    return all_reduce_sum(1.0 if flag else 0.0) > 0


def collective_device() -> torch.device:
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap(module: torch.nn.Module, parallel: str, layers: list[torch.nn.Module], param_dtype: torch.dtype | None):
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (`fully_shard`: each decoder layer
    its own shard group, then the root), or the module itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return module  # one plain process; under torchrun even one rank is wrapped (same code path as N)
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device().index] if torch.cuda.is_available() else None
        # broadcast_buffers=False: the buffers (rotary inv_freq) are constants, equal on every rank.
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Master weights stay in float32; compute in param_dtype; gradients reduced in float32.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def no_sync(parallel_model, last: bool):
    """Reduce gradients across ranks only on a step's last micro-batch (same result, 1/grad_accum
    of the traffic): DDP's no_sync() context; FSDP2 has no such context but a switch."""
    if is_fsdp(parallel_model):
        parallel_model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not hasattr(parallel_model, "no_sync"):
        return contextlib.nullcontext()
    return parallel_model.no_sync()


def load_sharded(parallel_model: torch.nn.Module, source: torch.nn.Module | None) -> None:
    """Give an FSDP2 module built on the meta device its weights, shard by shard.

    Every rank allocates only its own shards (to_empty); rank 0, the only one that read the
    checkpoint (`source`: its CPU copy in the compute dtype; None elsewhere), broadcasts one tensor
    at a time and each rank keeps its slice, cast to its shard's dtype (float32 masters). Buffers
    outside the state dict (rotary inv_freq, computed in __init__, garbage after to_empty) are
    rank 0's too. `parallel_model` wraps the model as `.model` (model.SFTModel).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    parallel_model.to_empty(device=device())
    full = {f"model.{name}": tensor for name, tensor in source.state_dict().items()} if source is not None else {}
    set_model_state_dict(parallel_model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = [{name: b for name, b in source.named_buffers()} if source is not None else None]
    dist.broadcast_object_list(buffers, src=0, device=collective_device())
    with torch.no_grad():
        for name, buffer in parallel_model.model.named_buffers():
            buffer.copy_(buffers[0][name])


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) gathered to a plain tensor; plain tensors pass through."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
