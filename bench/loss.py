"""Benchmark: the LM head + cross-entropy of one micro-batch's trained tokens, three ways.

Each side computes the summed cross-entropy of head(hidden) against random targets, then its
gradients (hidden and head weight; no bias, as in Llama and SmolLM2), in float32 on the CPU, for
--tokens trained tokens (default 4,096, not 8,192: plain peaks at ~3 x tokens x vocab x 4 bytes,
and the three matmuls take ~20 s a side on 2 busy cores) at two head shapes: hidden 576 with
SmolLM2-135M's 49,152-token vocabulary, and hidden 128 with Llama 3's 131,072 (a small hidden keeps
the matmuls, the same work on every side, from taking most of the run; memory barely depends on
it, through the (vocab, hidden) weight gradient only):

    plain    head(hidden).float() -> F.cross_entropy(reduction="sum"): the full (N, V) logits, and
             autograd keeps their log-softmax, another (N, V), for backward
    chunked  sft's loss before the fused one (`chunked_ce_sum` below): the same, 2,048 rows at a
             time, but every chunk's log-softmax stays in the graph until backward, so it bounds
             only the forward's temporaries
    fused    sft_cli.loss.linear_ce_sum (default chunk 1,024 rows): each chunk's loss and gradient
             computed in the forward, one logits buffer reused by every chunk

Measured per side: peak extra MB, how far the process's resident memory rose above where it
stood just before the forward, over forward + backward, gradients included (its high-water mark,
VmHWM in /proc/self/status, reset by `echo 5 > /proc/self/clear_refs` before each run; tensors this
large are mmap-ed by glibc and handed back to the kernel when freed, so each run starts from the
same baseline); wall seconds and CPU seconds (getrusage, user + system: steadier than wall time
when other processes share the cores) for forward + backward, each the best of --repeats after one
untimed small run; the relative gradient difference from plain, max |grad - plain grad| / max
|plain grad| over the hidden and weight gradients (and the same for the loss). "one chunk MB" is the fused loss's
bound: one chunk of float32 logits, chunk x vocab x 4 bytes.

    python -m bench.loss                 # ~2 min on 2 idle cores, ~10 on busy ones; writes BENCHMARKS.md "## loss ..."
    python -m bench.loss --tokens 1024 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import resource
import time
from pathlib import Path

import torch

from bench.common import machine, markdown, write_section
from sft_cli.loss import DEFAULT_CHUNK, linear_ce_sum, plain_ce_sum

PROG = "python -m bench.loss"
SECTION = "loss (fused LM head + cross-entropy)"
SHAPES = ((576, 49_152), (128, 131_072))  # (hidden, vocab): SmolLM2-135M, then Llama 3's vocabulary


def chunked_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int = 2048,
                   softcap: float | None = None) -> torch.Tensor:
    """sft's loss before the fused one: plain_ce_sum a chunk at a time. Only the forward's
    temporaries are chunked; each chunk's (c, V) log-softmax stays in the autograd graph until
    backward, so all N rows of it are alive at once."""
    total = hidden.sum().float() * 0.0  # attached to the graph even when N == 0 (DDP waits for every grad)
    for lo in range(0, hidden.shape[0], chunk):
        total = total + plain_ce_sum(hidden[lo:lo + chunk], targets[lo:lo + chunk], head, softcap)
    return total


SIDES = {"plain": plain_ce_sum, "chunked": chunked_ce_sum, "fused": linear_ce_sum}


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark), in MB."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) / 1024


def peak_extra_mb(fn):
    """(fn(), MB this process's resident memory peaked above where it stood when fn started).

    >>> _, mb = peak_extra_mb(lambda: torch.ones(2**25).sum())   # a 128 MB temporary
    >>> 120 < mb < 200
    True
    """
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM to the current VmRSS
    base = status_mb("VmRSS")
    out = fn()
    return out, status_mb("VmHWM") - base


def forward_backward(loss_fn, hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module):
    """(loss, grad of hidden, grad of the head weight) of one forward + backward."""
    hidden = hidden.detach().requires_grad_()
    head.zero_grad(set_to_none=True)
    loss = loss_fn(hidden, targets, head)
    loss.backward()
    return loss.detach(), hidden.grad, head.weight.grad


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(loss_fn, hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, repeats: int) -> dict:
    """Best forward + backward wall and CPU seconds and the largest peak extra MB over `repeats`
    runs, and the last run's loss and gradients."""
    forward_backward(loss_fn, hidden[:64], targets[:64], head)  # untimed: thread pools, first-call setup
    seconds, cpu, peak_mb, out = math.inf, math.inf, 0.0, None
    for _ in range(repeats):
        out = None  # drop the previous run's gradients before the next baseline is taken
        start, start_cpu = time.perf_counter(), cpu_seconds()
        out, mb = peak_extra_mb(lambda: forward_backward(loss_fn, hidden, targets, head))
        seconds, cpu = min(seconds, time.perf_counter() - start), min(cpu, cpu_seconds() - start_cpu)
        peak_mb = max(peak_mb, mb)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_extra_mb": peak_mb, "loss": out[0], "grads": out[1:]}


def relative_diff(got, want) -> float:
    """max |got - want| / max |want| over a list of tensors."""
    return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


def run_shape(tokens: int, hidden_size: int, vocab: int, repeats: int, log=print) -> list[dict]:
    """Every side on one (tokens, hidden, vocab) problem; plain first, as the gradients' reference."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=hidden_size ** -0.5, generator=gen)  # logits ~ N(0, 1)
    rows, reference = [], None
    for side, loss_fn in SIDES.items():
        result = measure(loss_fn, hidden, targets, head, repeats)
        reference = reference or result
        result.update(side=side, tokens=tokens, hidden=hidden_size, vocab=vocab,
                      grad_diff=relative_diff(result["grads"], reference["grads"]),
                      loss_diff=relative_diff([result["loss"]], [reference["loss"]]))
        log(f"{tokens} x {hidden_size} x {vocab} {side}: {result['seconds']:.2f} s, {result['cpu_seconds']:.2f} CPU s, "
            f"{result['peak_extra_mb']:,.0f} MB, grad diff {result['grad_diff']:.1e}")
        rows.append(result)
    for row in rows:
        row.pop("grads")  # the (V, H) gradients are only needed for the comparison
    return rows


HEADER = ["tokens", "hidden", "vocab", "side", "peak extra MB", "one chunk MB", "fwd+bwd s", "CPU s",
          "grad diff vs plain", "loss diff vs plain"]


def table_rows(results: list[dict]) -> list[list[str]]:
    return [[f"{r['tokens']:,}", str(r["hidden"]), f"{r['vocab']:,}", r["side"], f"{r['peak_extra_mb']:,.0f}",
             f"{DEFAULT_CHUNK * r['vocab'] * 4 / 2**20:,.0f}", f"{r['seconds']:.2f}",
             f"{r['cpu_seconds']:.2f}", f"{r['grad_diff']:.1e}", f"{r['loss_diff']:.1e}"] for r in results]


def section(results: list[dict], command: str) -> str:
    return "\n".join([
        f"## {SECTION}",
        "",
        "The LM head + summed cross-entropy over one micro-batch's trained tokens, float32 on the CPU, forward + "
        "backward (gradients of hidden and head weight): `plain` = full logits + `F.cross_entropy`; `chunked` = "
        "sft's loss before this one (the same 2,048 rows at a time, every chunk's log-softmax kept for backward); "
        f"`fused` = `sft_cli.loss.linear_ce_sum` (chunks of {DEFAULT_CHUNK:,} rows, each chunk's gradient computed "
        "in the forward, one logits buffer reused by every chunk). See the docstring of `bench/loss.py`.",
        "",
        "- **peak extra MB**: the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs "
        "just before the forward) minus its resident memory then; gradients included. **one chunk MB**: "
        "the fused loss's float32 logits for one chunk (chunk x vocab x 4 bytes), its bound.",
        "- **fwd+bwd s**: wall time, best of the repeats; **CPU s**: this process's user + system CPU time over "
        "the same run, best of the repeats (on a shared machine wall time also counts the waits for a core). "
        "**grad diff**, **loss diff**: max |x - plain| / max |plain| over "
        "the hidden and weight gradients, and of the loss.",
        "",
        markdown(HEADER, table_rows(results)),
        "",
        f"Command: `{command}`.",
        "",
        f"Machine: {machine(('torch',), torch_threads=True, load=True)}.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="trained tokens (rows of hidden states)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side; the fastest is kept")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    results = [row for hidden, vocab in SHAPES for row in run_shape(args.tokens, hidden, vocab, args.repeats)]
    print(markdown(HEADER, table_rows(results)))
    command = PROG + "".join(
        f" --{k} {getattr(args, k)}" for k, v in (("tokens", 4096), ("repeats", 2)) if getattr(args, k) != v)
    if not args.no_write:
        print(f"wrote the loss section of {write_section(SECTION, section(results, command))}")


if __name__ == "__main__":
    main()
