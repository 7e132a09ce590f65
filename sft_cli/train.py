"""`sft train`: the training loop. LoRA or full fine-tuning on packed rows, loss masking,
NEFTune, exact resume. Runs prepare and pack first when their outputs are missing.

One optimizer step, top to bottom (see `train`):
  1. the step's rows come from StepPlan (pure function of seed, epoch, step: resume needs no state),
     already collated and page-locked by a background thread while the previous step ran;
  2. seed dropout/NEFTune noise from (seed, step, rank); count the step's trained tokens N over
     every micro-batch of every rank, on the CPU from per-row counts (no collective);
  3. each micro-batch adds sum(CE) / N to the gradient, so the step's gradient is the mean over
     all its tokens, however the step is split into micro-batches or processes; compute in
     model.dtype under autocast, float32 master weights (precision.py);
  4. clip; one device-to-host read per step (loss, grad norm, stop votes); skip the step if they
     are not finite; optimizer and schedule step;
  5. log (with MFU and peak memory), evaluate and checkpoint on their intervals; SIGTERM/SIGINT
     checkpoint, then exit.

    sft train recipe=demo trainer.max_steps=20
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import datasets
import numpy as np
import torch

from sft_cli import console as ui
from sft_cli.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    save_final,
)
from sft_cli.config import SFTConfig, config_dict, to_yaml
from sft_cli.data.collate import VARLEN_BACKENDS, Collator, model_inputs, pin
from sft_cli.data.sampler import RowCounts, StepPlan
from sft_cli.distributed import (
    any_rank,
    collective_device,
    device,
    full_value,
    load_sharded,
    no_sync,
    process_group,
    world,
    wrap,
)
from sft_cli.errors import ConfigError, SFTError
from sft_cli.model import SFTModel, decoder_layers, load_model, unwrap
from sft_cli.neftune import neftune
from sft_cli.pack import ensure_packed
from sft_cli.plot import loss_curve
from sft_cli.precision import Precision
from sft_cli.prepare import load_prepared_tokenizer
from sft_cli.run_dir import (
    MetricsLog,
    fingerprint,
    is_complete,
    read_manifest,
    write_provenance,
    write_text_atomic,
)
from sft_cli.schedule import build_optimizer, build_scheduler
from sft_cli.scoring import score
from sft_cli.throughput import model_flops, peak_flops, peak_memory_mb
from sft_cli.trackers import Trackers

# Keys whose change makes a checkpoint meaningless for this run (resume refuses). Not grad_accum or
# the process count alone: the step is defined by their product (run_identity), so a run saved by
# 1 process x grad_accum 8 resumes on 2 processes x grad_accum 4 (StepPlan gives them the same rows).
RUN_DEFINING = ("seed", "max_seq_len", "model", "data", "pack", "peft", "optim", "trainer.micro_batch_size",
                "trainer.max_steps", "trainer.epochs", "trainer.neftune_alpha", "trainer.gradient_checkpointing")


def run(cfg: SFTConfig) -> int:
    from sft_cli import launch

    if launch.should_launch(cfg):
        return launch.launch(cfg, ensure_packed)  # N workers through torchrun, each comes back here as a rank
    with process_group(cfg.trainer.dist_timeout_s) as w:
        if not w.is_main:
            ui.silence()
        with launch.run_lock(Path(cfg.run_dir)):
            ensure_packed(cfg)  # already built by the launcher, or by the first rank to get the lock
        # Trackers (rank 0): the resolved config now, every metrics line, the loss curve at the end.
        with Trackers.open(cfg, Path(cfg.run_dir), enabled=w.is_main) as trackers:
            trackers.log_config(config_dict(cfg))
            return train(cfg, trackers)


def choose_parallel(cfg: SFTConfig, total_params: int) -> str:
    """ddp replicates weights (LoRA, small models); fsdp shards them (full FT of large models)."""
    if cfg.trainer.parallel == "auto":
        return "fsdp" if cfg.peft.method == "none" and total_params >= 1_000_000_000 else "ddp"
    return cfg.trainer.parallel


def run_identity(cfg: SFTConfig, world_size: int = 1) -> dict:
    """The values of RUN_DEFINING keys, flattened, and the micro-batches of one optimizer step:
    stored in checkpoints, compared on resume."""
    from omegaconf import OmegaConf

    flat = {}
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    for key in RUN_DEFINING:
        node = container
        for part in key.split("."):
            node = node[part]
        if isinstance(node, dict):
            flat.update({f"{key}.{k}": json.dumps(v, sort_keys=True) for k, v in node.items()})
        else:
            flat[key] = json.dumps(node)
    flat["micro_batches_per_step"] = json.dumps(cfg.trainer.grad_accum * world_size)
    return flat


class Stop:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit (0 / 130)."""

    def __init__(self):
        self.code = None
        for sig, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
            signal.signal(sig, lambda *_, c=code: setattr(self, "code", c))


def forward_loss(parallel_model, batch: dict) -> torch.Tensor:
    """Summed CE of one micro-batch through `parallel_model` (SFTModel, maybe DDP/FSDP-wrapped)."""
    return parallel_model(**model_inputs(batch), target_index=batch["target_index"], targets=batch["targets"])


def to_device(batch: dict, where: torch.device) -> dict:
    return {k: v.to(where, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def accumulate_gradients(parallel_model, batches: list[dict], step_targets: int, precision: Precision | None = None,
                         set_lengths=lambda *a: None) -> torch.Tensor:
    """Backward every micro-batch of one optimizer step; returns this rank's summed CE, still on
    the device (reading it would stall the GPU: the loop reads it once, after the step).

    Each micro-batch contributes sum(CE) / N_step, N_step the trained tokens of the whole step over
    every rank (counted on the CPU before the step, RowCounts), so the gradient is the token mean of
    the step: identical for 8x1, 4x2 or 2 processes x 4, never a mean of per-micro-batch means
    (which overweights short micro-batches).
    """
    precision = precision or Precision(torch.float32)
    scale = world().world_size / max(step_targets, 1)  # x world_size: DDP/FSDP average over ranks; we want the sum
    loss_sum = None
    for i, batch in enumerate(batches):
        set_lengths(batch["seq_lens"], batch["input_ids"].shape)
        with no_sync(parallel_model, last=i == len(batches) - 1):
            with precision.autocast():
                ce_sum = forward_loss(parallel_model, batch)
            precision.backward(ce_sum * scale)
        loss_sum = ce_sum.detach() if loss_sum is None else loss_sum + ce_sum.detach()
    return loss_sum


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's CPU and CUDA generators for one optimizer step of one rank.

    Dropout and NEFTune noise then differ across ranks (one seed everywhere would give every rank
    the same noise) and are a function of (seed, step, rank), not of generator state carried over:
    a resumed run draws exactly the noise the uninterrupted one drew, on any number of devices.
    The data order does not depend on this (StepPlan seeds itself from the global seed).
    """
    torch.manual_seed(int(np.random.SeedSequence([seed, 7, step, rank]).generate_state(1)[0]))


def _inject_fault(step: int, model) -> None:
    """Fault injection for the reliability tests (env vars, never set in normal use):
    SFT_FAULT_NAN_STEPS=3,4 poisons those steps' gradients; SFT_FAULT_KILL_STEP=5 SIGKILLs the
    process after step 5's backward, before its update (a crash mid-step); SFT_FAULT_KILL_RANK=1
    limits the kill to that rank of a multi-process job; SFT_FAULT_KILL_GROUP=1 also SIGKILLs the
    parent's process group (the launcher and its torchrun agent): with every rank doing so, the
    whole job dies at once."""
    import os

    if str(step) in os.environ.get("SFT_FAULT_NAN_STEPS", "").split(","):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
    rank_matches = os.environ.get("SFT_FAULT_KILL_RANK", str(world().rank)) == str(world().rank)
    if os.environ.get("SFT_FAULT_KILL_STEP") == str(step) and rank_matches:
        if os.environ.get("SFT_FAULT_KILL_GROUP") == "1":
            os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def step_values(loss_sum: torch.Tensor, grad_norm: torch.Tensor, stop: bool) -> tuple[float, float, float]:
    """(loss summed over ranks, grad norm, ranks asking to stop) as Python numbers: one collective
    and one device-to-host copy per step (DDP and FSDP2 grad norms are already global)."""
    summed = torch.stack([loss_sum.double(), torch.tensor(float(stop), dtype=torch.float64, device=loss_sum.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        summed = summed.to(collective_device())
        torch.distributed.all_reduce(summed)
    loss, votes = summed.tolist()
    return loss, grad_norm.item(), votes


class Prefetcher:
    """Collates step s + 1's micro-batches in a background thread while step s trains (collation
    is NumPy and Arrow, which release the GIL; the GPU, or torch's own threads, keep computing)."""

    def __init__(self, load, total_steps: int):
        from concurrent.futures import ThreadPoolExecutor

        self.load, self.total_steps = load, total_steps
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sft-collate")
        self.pending: tuple[int, object] | None = None

    def __call__(self, step: int) -> list[dict]:
        ready = self.pending[1].result() if self.pending and self.pending[0] == step else self.load(step)
        following = step + 1
        self.pending = (following, self.pool.submit(self.load, following)) if following < self.total_steps else None
        return ready

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True, cancel_futures=True)


def _compile(model, cfg: SFTConfig) -> None:
    """trainer.compile: torch.compile each decoder layer in place (after activation checkpointing,
    before FSDP2, the order torch.compile and fully_shard expect). Layers share one compiled
    graph; sequence lengths vary, so shapes are dynamic from the first recompile on."""
    if cfg.trainer.compile:
        for layer in decoder_layers(model):
            layer.compile()


def train(cfg: SFTConfig, trackers: Trackers | None = None) -> int:
    w = world()
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)  # bitwise resume on CPU
    tokenizer = load_prepared_tokenizer(run_dir / "prepared")
    splits = datasets.load_from_disk(str(run_dir / "packed"))

    rows = splits["train"].select_columns(["input_ids", "labels", "position_ids", "seq_lens"])
    eval_rows = splits["eval"].select_columns(rows.column_names) if "eval" in splits else None
    counts = RowCounts.of(rows)  # per-row tokens and targets: batch grouping, step totals, MFU
    plan = StepPlan(len(rows), cfg.trainer.micro_batch_size, cfg.trainer.grad_accum, w.world_size, cfg.seed,
                    lengths=counts.tokens.tolist() if cfg.pack.strategy == "none" else None)
    if plan.steps_per_epoch == 0:
        raise ConfigError("trainer.micro_batch_size", f"{len(rows)} packed rows cannot fill one step of "
                          f"{plan.micro_batches_per_step} micro-batches", "lower micro_batch_size or grad_accum")
    total_steps = plan.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps)
    identity = run_identity(cfg, w.world_size)
    fingerprints = {"run": fingerprint(identity), "identity": identity,
                    "packed": read_manifest(run_dir / "packed")["fingerprint"]}
    # Rank 0's reading, on every rank: what follows (finding a checkpoint) is collective.
    if any_rank(w.is_main and _finished(run_dir, fingerprints, total_steps)) and cfg.trainer.resume == "auto":
        ui.err.print(f"[green]already finished[/]: {run_dir / 'final'} holds all {total_steps} steps of this "
                     "config (trainer.resume=never to train again)")
        return 0

    # Model -> loss module -> DDP / FSDP2 (or nothing in one process) -> optimizer.
    where = device()
    precision = Precision.of(cfg.model.dtype, where)
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    # Under torchrun, the model's shape first (meta device: no weights read) decides ddp or fsdp.
    model, info = load_model(cfg, tokenizer, cfg.model.name_or_path, empty=joined)
    info["parallel"] = choose_parallel(cfg, info["total_params"]) if joined else "none"
    if info["parallel"] == "fsdp":
        if precision.scaler:
            raise ConfigError("model.dtype", "float16 needs a gradient scaler, which sft does not run under FSDP2",
                              "use model.dtype=bfloat16 (GPUs since Ampere) or trainer.parallel=ddp")
        _compile(model, cfg)
        parallel_model = wrap(SFTModel(model), "fsdp", decoder_layers(model), precision.compute)
        torch.manual_seed(cfg.seed)  # rank 0's LoRA initialisation is the one every rank receives
        source = load_model(cfg, tokenizer, cfg.model.name_or_path, masters=False)[0] if w.is_main else None
        load_sharded(parallel_model, source)
        del source
    else:
        if joined:  # now the weights, on every rank (DDP replicas start equal: same seed, same files)
            torch.manual_seed(cfg.seed)
            model = load_model(cfg, tokenizer, cfg.model.name_or_path)[0]
        model.to(where)
        _compile(model, cfg)
        parallel_model = wrap(SFTModel(model), info["parallel"], decoder_layers(model), precision.compute)
    model.train()
    collate = Collator(pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                       flat=info["attn_implementation"] in VARLEN_BACKENDS)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    config = unwrap(model).config
    device_peak = peak_flops(where, precision.compute)

    step, state = 0, {"tokens": 0, "loss_tokens": 0, "bad_streak": 0, "elapsed_s": 0.0}
    resume_from = resumable_checkpoint(run_dir) if cfg.trainer.resume == "auto" else None
    if resume_from is not None:
        _check_resumable(resume_from, fingerprints)
        state = load_checkpoint(resume_from, model, parallel_model, optimizer, scheduler)
        precision.load_state_dict(state.get("loss_scale", {}))
        step = state["step"]
        ui.err.print(f"[green]resuming[/] from {resume_from} (step {step} of {total_steps})")
    elif w.is_main and (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")  # starting over: old checkpoints would mix two runs
    metrics_path = run_dir / "metrics.jsonl"
    if w.is_main:
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
        write_provenance(run_dir)
        _truncate_metrics(metrics_path, step)
        packed = json.loads((run_dir / "packed" / "report.json").read_text())["splits"]["train"]
        ui.print_train_start(info, plan, total_steps, cfg, packed)

    stop, started = Stop(), time.perf_counter() - state["elapsed_s"]

    def save() -> None:
        state["loss_scale"] = precision.state_dict()
        _checkpoint(run_dir, step, model, parallel_model, optimizer, scheduler, state, cfg, fingerprints)

    def load_step(s: int) -> list[dict]:
        batches = [collate(rows.select(ids)) for ids in plan.micro_batches(s, w.rank)]
        return [pin(b) for b in batches] if where.type == "cuda" else batches  # page-locked: async copies

    with neftune(model, cfg.trainer.neftune_alpha) as set_lengths, ui.train_progress(total_steps, step, w) as bar, \
            MetricsLog(run_dir, enabled=w.is_main, trackers=trackers) as metrics, Prefetcher(load_step, total_steps) as prefetched:
        stopping = False
        while step < total_steps and not stopping:
            step_started = time.perf_counter()
            seed_step(cfg.seed, step, w.rank)
            tokens, step_targets, attention = counts.total(plan.step_rows(step))  # every rank's rows, on the CPU
            batches = [to_device(b, where) for b in prefetched(step)]  # collated meanwhile in a thread
            loss_sum = accumulate_gradients(parallel_model, batches, step_targets, precision, set_lengths)
            _inject_fault(step + 1, model)
            precision.unscale(optimizer)
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = full_value(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm or float("inf")))
            # The step's one host-device sync (and one collective): loss, grad norm, stop votes.
            loss_sum, grad_norm, stop_votes = step_values(loss_sum, grad_norm, stop.code is not None)
            loss = loss_sum / max(step_targets, 1)
            if math.isfinite(loss) and math.isfinite(grad_norm):
                precision.step(optimizer)
                state["bad_streak"] = 0
            elif precision.skip() is not None and math.isfinite(loss):  # float16: a routine overflow
                ui.err.print(f"[yellow]step {step + 1}: float16 gradients overflowed; skipped, loss scale now "
                             f"{precision.scaler.get_scale():g}[/]")
            else:  # never let a NaN reach the weights: skip the update, keep the data moving
                state["bad_streak"] += 1
                ui.err.print(f"[yellow]step {step + 1}: non-finite loss/grad ({loss}, {grad_norm}); skipped[/]")
                if state["bad_streak"] > cfg.trainer.max_bad_steps:
                    raise SFTError(f"{state['bad_streak']} non-finite steps in a row (trainer.max_bad_steps="
                                   f"{cfg.trainer.max_bad_steps}); stopping. Lower optim.lr or check the data.")
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            seconds = max(time.perf_counter() - step_started, 1e-9)
            flops = model_flops(config, tokens, attention, lora=cfg.peft.method != "none")
            state["tokens"] += tokens
            state["loss_tokens"] += step_targets
            state["elapsed_s"] = time.perf_counter() - started
            record = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), "loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens": tokens, "loss_tokens": step_targets,
                      "tokens_per_sec": tokens / seconds, "mfu": round(flops / seconds / (device_peak * w.world_size), 4),
                      "peak_mem_mb": round(peak_memory_mb(where), 1), "elapsed_s": round(state["elapsed_s"], 3)}
            metrics.write(record)
            if w.is_main:
                bar(step, record)
            if eval_rows is not None and cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                _log_eval(parallel_model, eval_rows, collate, cfg, step, metrics, w, precision)
            stopping = stop_votes > 0  # every rank stops after the same step
            if (cfg.trainer.save_every and step % cfg.trainer.save_every == 0) or stopping:
                save()

    if stopping:
        ui.err.print(f"[yellow]stopped by signal at step {step}; checkpoint saved. Re-run the same command to resume.")
        return stop.code if stop.code is not None else 0
    if eval_rows is not None and not (cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0):
        with MetricsLog(run_dir, enabled=w.is_main, trackers=trackers) as metrics:
            _log_eval(parallel_model, eval_rows, collate, cfg, step, metrics, w, precision)
    save()
    prepared_report = json.loads((run_dir / "prepared" / "report.json").read_text())
    save_final(run_dir, model, parallel_model, tokenizer, prepared_report.get("eot_token_ids", []))
    if w.is_main:
        _finish(run_dir, metrics_path, cfg, info, trackers)
    return 0


def _log_eval(parallel_model, eval_rows, collate, cfg, step, metrics, w, precision) -> None:
    """The eval split scored like `sft evaluate` scores it (scoring.score), this rank's share of rows."""
    mine = list(range(w.rank, len(eval_rows), w.world_size))
    size = cfg.trainer.micro_batch_size
    batches = [collate(eval_rows.select(mine[lo:lo + size])) for lo in range(0, len(mine), size)]
    spare = None if batches else collate(eval_rows.select([0]))  # fewer rows than ranks: run, discard
    result = score(parallel_model, batches, precision=precision, spare=spare).summary()
    if w.is_main:
        metrics.write({"type": "eval", "step": step, "eval_loss": result["loss"], "eval_ppl": result["ppl"],
                       "eval_token_accuracy": result["token_accuracy"], "eval_tokens": result["tokens"]})
        ui.err.print(f"step {step}: eval loss {result['loss']:.4f} (ppl {result['ppl']:.2f})")


def _checkpoint(run_dir, step, model, parallel_model, optimizer, scheduler, state, cfg, fingerprints) -> None:
    if state.get("saved_step") != step:  # collective: every rank decides alike
        state["saved_step"] = step
        save_checkpoint(run_dir, step, model, parallel_model, optimizer, scheduler, {**state, "step": step}, cfg,
                        fingerprints, cfg.trainer.keep_last)


def _finished(run_dir: Path, fingerprints: dict, total_steps: int) -> bool:
    """final/ exists and the newest checkpoint is this very run's last step: nothing to do."""
    latest = latest_checkpoint(run_dir)
    saved = read_manifest(latest) if latest else None
    return bool(saved and is_complete(run_dir / "final") and saved.get("step") == total_steps
                and saved.get("run") == fingerprints["run"] and saved.get("packed") == fingerprints["packed"])


def _check_resumable(folder: Path, fingerprints: dict) -> None:
    saved = read_manifest(folder) or {}
    if saved.get("run") == fingerprints["run"] and saved.get("packed") == fingerprints["packed"]:
        return
    if saved.get("packed") != fingerprints["packed"]:
        raise SFTError(f"refusing to resume from {folder}: the packed data changed since it was written. "
                       "Use trainer.resume=never to start over, or a new run_dir.")
    old, new = saved.get("identity", {}), fingerprints["identity"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    detail = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in changed[:4])
    raise SFTError(f"refusing to resume from {folder}: {detail}. Use trainer.resume=never to start over, "
                   "or a new run_dir.")


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop lines past the checkpoint so the file reads like one uninterrupted run.
    A kill mid-write can leave a torn last line: it is past the checkpoint too, so it goes."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines() if step > 0 else []:  # step 0: nothing survives
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _finish(run_dir: Path, metrics_path: Path, cfg: SFTConfig, info: dict, trackers: Trackers | None) -> None:
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    loss_curve(lines, run_dir / "loss_curve.png", curve_title(cfg, info, lines))
    if trackers is not None:
        trackers.log_image(run_dir / "loss_curve.png")
    ui.print_train_summary(lines, run_dir)


def curve_title(cfg: SFTConfig, info: dict, lines: list[dict]) -> str:
    """The loss curve's title: what ran (run, model, method) and the numbers that shaped the curve."""
    steps = [r for r in lines if "loss" in r]
    tokens = sum(r.get("tokens", 0) for r in steps)
    method = "full fine-tuning" if cfg.peft.method == "none" else f"{cfg.peft.method} r={cfg.peft.r}"
    return (f"{Path(cfg.run_dir).name}: {cfg.model.name_or_path} ({method}, {info.get('dtype', cfg.model.dtype)})\n"
            f"lr {cfg.optim.lr:g} ({cfg.optim.schedule}), {len(steps)} steps, ~{tokens // max(len(steps), 1):,} "
            f"tokens/step, {tokens:,} tokens, max_seq_len {cfg.max_seq_len}, seed {cfg.seed}")
