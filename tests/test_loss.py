"""The fused LM head + cross-entropy equals the plain loss (full logits + F.cross_entropy) in
value and gradients, in every head/precision case, and its peak memory is about one chunk."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.loss import SIDES, forward_backward, peak_extra_mb
from sft_cli.loss import _is_plain_linear, linear_ce_sum, plain_ce_sum

REPO = Path(__file__).resolve().parent.parent


def problem(n=37, hidden=8, vocab=50, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen))
    return torch.randn(n, hidden, generator=gen), torch.randint(0, vocab, (n,), generator=gen), head


def loss_and_grads(loss_fn, hidden, targets, head, scale=1.0):
    """(loss, [grad of hidden, then of every head parameter that trains]) of (scale * loss).backward()."""
    hidden = hidden.detach().requires_grad_()
    head.zero_grad(set_to_none=True)
    loss = loss_fn(hidden, targets, head)
    (loss * scale).backward()
    return loss.detach(), [hidden.grad] + [p.grad for p in head.parameters() if p.requires_grad]


def assert_same(got, want, rtol):
    """Loss and gradients equal up to rtol of each tensor's largest magnitude."""
    for g, w in zip([got[0]] + got[1], [want[0]] + want[1], strict=True):
        assert g.dtype == w.dtype
        assert ((g - w).abs().max() / w.abs().max()).item() <= rtol


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("chunk", [5, 8, 1024])  # 5, 8 do not divide 37; 1024 is one chunk
def test_fused_equals_plain_float32(bias, softcap, chunk):
    hidden, targets, head = problem(bias=bias)
    assert _is_plain_linear(head)
    fused = functools.partial(linear_ce_sum, chunk=chunk, softcap=softcap)
    plain = functools.partial(plain_ce_sum, softcap=softcap)
    # scale: backward must multiply the gradients it stored in forward by grad_output
    got, want = loss_and_grads(fused, hidden, targets, head, 3.7), loss_and_grads(plain, hidden, targets, head, 3.7)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert_same(got, want, 1e-5)


def test_frozen_weight_computes_no_weight_gradient():
    hidden, targets, head = problem(bias=False)
    head.weight.requires_grad_(False)  # LoRA's frozen base
    loss = linear_ce_sum(hidden.requires_grad_(), targets, head, chunk=8)
    assert loss.grad_fn.saved_tensors[1] is None  # grad_weight never allocated in forward
    hidden_grad, = torch.autograd.grad(loss, hidden)
    want, = torch.autograd.grad(plain_ce_sum(hidden, targets, head), hidden)
    torch.testing.assert_close(hidden_grad, want, rtol=1e-5, atol=1e-6)
    assert head.weight.grad is None


def test_tied_weight_gradients_add_up():
    _, targets, head = problem(bias=False)
    embed = torch.nn.Embedding(50, 8)
    head.weight = embed.weight  # tied: the head's weight IS the embedding's Parameter
    ids = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(1))
    grads = []
    for loss_fn in (functools.partial(linear_ce_sum, chunk=8), plain_ce_sum):
        embed.zero_grad(set_to_none=True)
        loss_fn(torch.tanh(embed(ids)), targets, head).backward()  # a "body" between embedding and head
        grads.append(embed.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_no_rows_still_backpropagates_to_every_parameter():
    hidden, targets, head = problem()
    hidden = hidden[:0].requires_grad_()
    loss = linear_ce_sum(hidden, targets[:0], head)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == 0
    assert hidden.grad is not None and all(p.grad is not None and not p.grad.any() for p in head.parameters())


def test_no_grad_gives_the_same_loss():
    hidden, targets, head = problem()
    with torch.no_grad():
        loss = linear_ce_sum(hidden, targets, head, chunk=8)
    torch.testing.assert_close(loss, plain_ce_sum(hidden, targets, head).detach(), rtol=1e-6, atol=0)


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 50, bias=False)


@pytest.mark.parametrize("adapter", ["lora", "modules_to_save"])
def test_peft_head_takes_the_recompute_path(adapter):
    import peft

    torch.manual_seed(0)
    options = ({"target_modules": ["lm_head"], "init_lora_weights": False} if adapter == "lora"  # B != 0
               else {"target_modules": ["body"], "modules_to_save": ["lm_head"]})
    model = peft.get_peft_model(TinyLM(), peft.LoraConfig(r=4, lora_dropout=0.0, **options))
    head = model.base_model.model.lm_head
    assert not _is_plain_linear(head)
    rows = []
    head.register_forward_hook(lambda module, inp, out: rows.append(inp[0].shape[0]))
    hidden, targets, _ = problem()
    got = loss_and_grads(functools.partial(linear_ce_sum, chunk=8), hidden, targets, head)
    assert rows == [8, 8, 8, 8, 5] + [5, 8, 8, 8, 8]  # forward, then backward recomputes each chunk (last first)
    assert_same(got, loss_and_grads(plain_ce_sum, hidden, targets, head), 1e-5)
    assert len(got[1]) > 1  # the trainable adapter (or copy) weights were compared too


def test_bf16_autocast_matches_plain_autocast():
    hidden, targets, head = problem(n=300, hidden=64, vocab=500)  # float32 master weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(functools.partial(linear_ce_sum, chunk=64), hidden, targets, head)
        want = loss_and_grads(plain_ce_sum, hidden, targets, head)
    assert head.weight.grad.dtype == torch.float32 and got[0].dtype == torch.float32
    assert_same(got, want, 2e-2)  # bf16 products: ~3 significant digits
    # matmuls really ran in bf16: a float32 loss differs from both by more than their difference
    exact = loss_and_grads(plain_ce_sum, hidden, targets, head)[0]
    assert (got[0] - want[0]).abs() < (exact - want[0]).abs()


def test_bf16_model_without_autocast():
    hidden, targets, head = problem(n=300, hidden=64, vocab=500)
    head, hidden = head.bfloat16(), hidden.bfloat16()
    got = loss_and_grads(functools.partial(linear_ce_sum, chunk=64), hidden, targets, head)
    assert head.weight.grad.dtype == torch.bfloat16
    assert_same(got, loss_and_grads(plain_ce_sum, hidden, targets, head), 2e-2)


# -- peak memory, measured in a fresh process --------------------------------------------------------

def peak_worker(side: str, tokens: int, vocab: int, chunk: int, hidden: int = 16) -> None:
    """Print {peak_mb, row_grad_diff} of one forward + backward of SIDES[side] as JSON.

    row_grad_diff: hidden's gradient rows are independent of each other, so its first and last
    256 rows must equal the plain loss's on those rows alone (cheap to compute at any N).
    """
    hidden_states, targets, head = problem(tokens, hidden, vocab, bias=False)
    loss_fn = functools.partial(SIDES[side], chunk=chunk)
    forward_backward(loss_fn, hidden_states[:64], targets[:64], head)  # first-call setup outside the peak
    (_, grad, _), peak_mb = peak_extra_mb(lambda: forward_backward(loss_fn, hidden_states, targets, head))
    diffs = []
    for rows in (slice(0, 256), slice(tokens - 256, tokens)):
        want = forward_backward(plain_ce_sum, hidden_states[rows], targets[rows], head)[1]
        diffs.append(((grad[rows] - want).abs().max() / want.abs().max()).item())
    print(json.dumps({"peak_mb": peak_mb, "row_grad_diff": max(diffs)}))


def measure(side, tokens, vocab, chunk):
    code = f"from tests.test_loss import peak_worker; peak_worker({side!r}, {tokens}, {vocab}, {chunk})"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_fused_peak_memory_is_one_chunk_of_logits():
    tokens, vocab, chunk = 8192, 131_072, 512
    one_chunk_mb = chunk * vocab * 4 / 2**20  # 256 MB; the full logits would be 4,096 MB
    result = measure("fused", tokens, vocab, chunk)
    assert result["peak_mb"] < 2 * one_chunk_mb, result
    assert result["row_grad_diff"] < 1e-4, result  # float32 sums over 131k vocab entries, in other orders


def test_old_chunked_loss_exceeds_that_bound():
    # negative control: the same measurement catches a loss that keeps every chunk for backward
    tokens, vocab, chunk = 1024, 131_072, 128
    result = measure("chunked", tokens, vocab, chunk)
    # 64 MB a chunk, bound 128 MB; it keeps every chunk's log-softmax for backward: all N rows,
    # 512 MB (measured: ~640 MB with the backward's temporaries)
    assert result["peak_mb"] > tokens * vocab * 4 / 2**20, result
    assert result["row_grad_diff"] < 1e-4, result
