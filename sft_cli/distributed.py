"""Process-group facts and collectives the trainer needs; all no-ops in a single process.

Workers are started by torchrun (see launch.py) or by the user's own outer torchrun; either
way the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) says who we are.

    with process_group():            # init from torchrun's env (nccl on GPU, gloo on CPU)
        info = world()               # rank, world_size, local_rank, is_main
        total = all_reduce_sum(n)
        engine = wrap(loss_module, strategy="ddp")
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

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
def process_group():
    """Join the job torchrun started (if any) for the duration of the block."""
    joined = launched_by_torchrun() and not dist.is_initialized()
    if joined:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        dist.init_process_group(backend, device_id=device() if backend == "nccl" else None)
    try:
        yield world()
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float | int) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.item()


def all_reduce_max(value: float | int) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: ranks agree on stopping at the same step."""
    return all_reduce_sum(1.0 if flag else 0.0) > 0


def _collective_device() -> torch.device:
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap(module: torch.nn.Module, strategy: str, layers: list[torch.nn.Module], param_dtype: torch.dtype | None):
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (`fully_shard`: each decoder layer
    its own shard group, then the root), or the module itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return module  # one plain process; under torchrun even one rank is wrapped (same code path as N)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device().index] if torch.cuda.is_available() else None
        return DistributedDataParallel(module, device_ids=ids)
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


def no_sync(engine, last: bool):
    """Skip DDP's gradient all-reduce on every micro-batch but the step's last (same result, less traffic)."""
    if last or not hasattr(engine, "no_sync"):
        return contextlib.nullcontext()
    return engine.no_sync()


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) gathered to a plain tensor; plain tensors pass through."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
