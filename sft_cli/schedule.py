"""Optimizer and learning-rate schedule.

    optimizer = build_optimizer(model, cfg.optim)          # AdamW, no decay on norms/biases
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=100)

Schedules (warmup is linear from 0 in every case), as a multiplier of the peak lr:

    cosine    min + (1 - min) * (1 + cos(pi * progress)) / 2
    linear    min + (1 - min) * (1 - progress)
    constant  1
"""

from __future__ import annotations

import math

import torch

from sft_cli.config import OptimConfig


def _cosine(progress: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(progress: float, floor: float) -> float:
    return floor + (1 - floor) * (1 - progress)


def _constant(progress: float, floor: float) -> float:
    return 1.0


# optim.schedule's names (config.SCHEDULES, which validate() checks) -> the multiplier they compute.
SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier for the lr used at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return SCHEDULES[schedule](min(progress, 1.0), min_lr_ratio)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    warmup = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio))


def build_optimizer(model, cfg: OptimConfig):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Norm gains and biases are 1-D: decaying them pulls scales toward 0 for no benefit.
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_gpu = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=True if on_gpu else None, foreach=None if on_gpu else True)
