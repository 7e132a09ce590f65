"""The learning-rate schedule, by hand: lr_multiplier at the start, the end of warmup, the middle and
the end of each schedule, the min_lr_ratio floor, and where the warmup length comes from."""

from __future__ import annotations

import math

import pytest
import torch

from sft_cli.config import OptimConfig
from sft_cli.schedule import SCHEDULES, build_scheduler, lr_multiplier, warmup_steps

# 10 steps, 2 of warmup: steps 0-1 ramp up, steps 2-9 decay over 8 steps (progress (step - 2) / 8),
# and step 10 (what LambdaLR asks after the last step) is the end of the decay.
TOTAL, WARMUP = 10, 2


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_warmup_is_linear_from_zero_and_ends_at_the_peak(schedule):
    # Step s of warmup uses (s + 1) / warmup: the first step already trains, the last is at the peak.
    assert lr_multiplier(0, TOTAL, WARMUP, schedule, 0.0) == 0.5
    assert lr_multiplier(1, TOTAL, WARMUP, schedule, 0.0) == 1.0
    assert lr_multiplier(2, TOTAL, WARMUP, schedule, 0.0) == 1.0  # first decay step: progress 0
    assert [lr_multiplier(s, 8, 4, schedule, 0.3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # floor ignored


@pytest.mark.parametrize("step, expected", [
    (2, 1.0),
    (4, (1 + math.cos(math.pi / 4)) / 2),   # progress 2/8: 0.8536
    (6, 0.5),                                # mid: progress 1/2
    (9, (1 + math.cos(math.pi * 7 / 8)) / 2),  # last step: progress 7/8, 0.0381
    (10, 0.0),                               # the end
    (15, 0.0),                               # past the end: stays there
])
def test_cosine(step, expected):
    assert lr_multiplier(step, TOTAL, WARMUP, "cosine", 0.0) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step, expected", [(2, 1.0), (4, 0.75), (6, 0.5), (9, 0.125), (10, 0.0), (15, 0.0)])
def test_linear(step, expected):
    assert lr_multiplier(step, TOTAL, WARMUP, "linear", 0.0) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step", [2, 6, 9, 10, 15])
def test_constant_after_warmup(step):
    assert lr_multiplier(step, TOTAL, WARMUP, "constant", 0.5) == 1.0  # no floor: it never decays


@pytest.mark.parametrize("schedule, step, expected", [
    ("cosine", 6, 0.1 + 0.9 * 0.5),     # mid: halfway between the peak and the floor
    ("cosine", 10, 0.1),
    ("cosine", 15, 0.1),
    ("linear", 9, 0.1 + 0.9 * 0.125),
    ("linear", 10, 0.1),
    ("linear", 15, 0.1),
])
def test_min_lr_ratio_is_the_floor(schedule, step, expected):
    assert lr_multiplier(step, TOTAL, WARMUP, schedule, 0.1) == pytest.approx(expected, abs=1e-12)
    assert min(lr_multiplier(s, TOTAL, WARMUP, schedule, 0.1) for s in range(WARMUP, 20)) == pytest.approx(0.1)


def test_no_warmup_starts_at_the_peak():
    assert lr_multiplier(0, TOTAL, 0, "cosine", 0.0) == 1.0
    assert lr_multiplier(5, TOTAL, 0, "linear", 0.0) == 0.5  # progress 5/10
    assert lr_multiplier(0, 1, 0, "linear", 0.0) == 1.0      # one step: no division by zero


def test_warmup_steps_wins_over_warmup_ratio():
    assert warmup_steps(OptimConfig(), 100) == 0
    assert warmup_steps(OptimConfig(warmup_steps=5), 100) == 5
    assert warmup_steps(OptimConfig(warmup_steps=5, warmup_ratio=0.5), 100) == 5
    assert warmup_steps(OptimConfig(warmup_ratio=0.1), 100) == 10
    assert warmup_steps(OptimConfig(warmup_ratio=0.1), 37) == 4  # 3.7, rounded
    assert warmup_steps(OptimConfig(warmup_ratio=0.03), 40) == 1  # 1.2, rounded
    assert warmup_steps(OptimConfig(warmup_ratio=1.0), 8) == 8  # all warmup


def test_the_scheduler_sets_peak_lr_times_the_multiplier_at_every_step():
    cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_ratio=0.2, min_lr_ratio=0.1)  # 2 warmup steps of 10
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, TOTAL)
    used = []
    for _ in range(TOTAL):
        used.append(optimizer.param_groups[0]["lr"])  # the lr this step's update uses
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([1e-3 * lr_multiplier(s, TOTAL, WARMUP, "cosine", 0.1) for s in range(TOTAL)])
    assert used[:3] == pytest.approx([0.5e-3, 1e-3, 1e-3])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # after the last step: the floor
