"""Cross-entropy of the LM head over trained positions, with at most one chunk of logits alive.

Full logits are (tokens, vocab) float32: 8,192 tokens x 128k vocab = 4.3 GB, and autograd keeps
about as much again for the log-softmax. `linear_ce_sum` never holds more than one chunk of rows:

- a plain `nn.Linear` head (the usual case, tied, frozen or FSDP2-unsharded weights included)
  goes through `_LinearCE`, which computes each chunk's loss AND its gradient in the forward
  (softmax minus one-hot, in place), turns it into that chunk's grad_hidden and adds it into
  grad_weight, then reuses the logits buffer for the next chunk. Backward only scales those
  stored gradients.
- any other head (peft LoRA, ModulesToSaveWrapper, a module with hooks) is called as a module,
  one checkpointed chunk at a time: backward recomputes each chunk's logits just before it needs them.

The caller has already gathered the trained positions, so every target is a real token id
(no -100 here: `shifted_targets`/`IGNORE_INDEX` are for building them).

    targets = shifted_targets(labels).flatten()                     # (B * T,)
    keep = targets != IGNORE_INDEX
    loss_sum = linear_ce_sum(hidden.flatten(0, 1)[keep], targets[keep], model.lm_head)
    (loss_sum / tokens_in_step).backward()                          # loss_sum: 0-dim float32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft_cli.data import IGNORE_INDEX

# Rows per chunk: 1024 x 128k vocab x 4 bytes = 512 MB of float32 logits (192 MB at SmolLM2's
# 49k). Speed hardly depends on it: on CPU, 2,048 tokens x 576 x 49k, chunks of 256 to 2,048 rows
# cost 8.9-9.5 CPU-seconds, 1,024 the least.
DEFAULT_CHUNK = 1024


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]; the last position has no target.

    >>> shifted_targets(torch.tensor([[5, 6, 7]])).tolist()
    [[6, 7, -100]]
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def linear_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int = DEFAULT_CHUNK,
                  softcap: float | None = None) -> torch.Tensor:
    """Sum over rows of CE(head(hidden), targets) as a 0-dim float32, `chunk` rows at a time.

    hidden: (N, H) hidden states of trained positions; targets: (N,) token ids, all trained.
    softcap: Gemma-2's final_logit_softcapping, logits = c * tanh(logits / c).
    Under torch.autocast the head's matmuls run in the autocast dtype (as F.linear would), the
    softmax always in float32.

        loss_sum = linear_ce_sum(picked, targets, model.lm_head, softcap=config.final_logit_softcapping)
        (loss_sum / n_tokens_in_step).backward()
    """
    if hidden.shape[0] == 0:
        # Still attached to every head parameter and to hidden: DDP waits for each gradient,
        # and a micro-batch with nothing to train must still produce them (zeros).
        return (hidden.sum().float() + head(hidden).float().sum()) * 0.0
    if _is_plain_linear(head) and torch.is_grad_enabled():  # under no_grad the chunk loop keeps no graph anyway
        return _LinearCE.apply(hidden, head.weight, head.bias, targets, chunk, softcap,
                               _compute_dtype(hidden, head.weight))
    return _checkpointed_ce_sum(hidden, targets, head, chunk, softcap)


def _is_plain_linear(head: torch.nn.Module) -> bool:
    """Exactly nn.Linear with no hooks: only then is reading .weight the same as calling it.
    (fully_shard-ed or peft-wrapped heads are other classes; hooks expect to be called.)"""
    return type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) would multiply in: autocast's inside torch.autocast,
    else the inputs' own (bf16 for a bf16 model).

    Not torch.amp.custom_fwd: it fixes the device type when the class is defined; ours comes
    from the tensor, so one Function serves CPU and CUDA.
    """
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _ce_sum_and_grad_(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE, d CE_sum / d logits) of float32 logits (c, V), reusing their buffer for the gradient.

    d CE / d z = softmax(z) - one_hot(target); with a softcap s = c tanh(z / c) the chain rule
    adds a factor ds/dz = 1 - tanh^2, so tanh is kept in `logits` and the softmax of s goes into
    a second (c, V) buffer: twice the memory, which is why softcapped chunks are half as tall.

    >>> z = torch.tensor([[0.0, 0.0]]); _ce_sum_and_grad_(z, torch.tensor([1]), None)
    (tensor(0.6931), tensor([[ 0.5000, -0.5000]]))
    """
    if softcap:
        tanh = logits.div_(softcap).tanh_()
        loss, grad = _ce_sum_and_grad_(tanh * softcap, targets, None)
        return loss, grad.mul_(tanh.square_().neg_().add_(1.0))
    rows = targets[:, None]
    target_logit = logits.gather(1, rows)
    top = logits.amax(1, keepdim=True)
    # In place from here: logits -> exp(logits - max) -> softmax -> softmax - one_hot.
    sum_exp = logits.sub_(top).exp_().sum(1, keepdim=True)
    loss = (sum_exp.log() + top - target_logit).sum()  # -log softmax[target] = logsumexp - target logit
    logits.div_(sum_exp).scatter_add_(1, rows, logits.new_full(rows.shape, -1.0))
    return loss, logits


class _LinearCE(torch.autograd.Function):
    """CE sum of F.linear(hidden, weight, bias) whose gradients are all computed in forward.

    Peak extra memory: one chunk's float32 logits (one buffer, reused by every chunk and by its
    gradient; in bf16 also a half-size bf16 copy) plus grad_hidden (N, H) and a float32
    grad_weight (V, H), which a plain backward allocates too. Nothing chunk-sized is saved.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, softcap, dtype):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        device = hidden.device
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # float32 accumulators whatever the compute dtype: a bf16 sum over chunks would round each step.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=device) if want_bias else None
        total = torch.zeros((), dtype=torch.float32, device=device)
        rows = max(1, chunk // 2) if softcap else chunk  # softcap holds two (rows, V) buffers
        # One logits buffer for every chunk: a fresh one per chunk would be mmap-ed, page-faulted
        # and zeroed by the kernel each time (a third of the time on CPUs when hidden is small).
        buffer = torch.empty(min(rows, hidden.shape[0]), weight.shape[0], dtype=torch.float32, device=device)
        # Explicit dtypes below, so autocast must not re-cast anything (e.g. g @ w back to float32).
        with torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)  # one cast of the whole head, as autocast's F.linear would make
            b = bias.to(dtype) if bias is not None else None
            for lo in range(0, hidden.shape[0], rows):
                h = hidden[lo:lo + rows].to(dtype)                                # (c, H)
                logits = _linear_into(buffer[:h.shape[0]], h, w, b)              # (c, V) float32
                loss, grad = _ce_sum_and_grad_(logits, targets[lo:lo + rows], softcap)
                total += loss
                if want_bias:
                    grad_bias += grad.sum(0)
                grad = grad.to(dtype)  # no copy in float32
                if want_hidden:
                    grad_hidden[lo:lo + rows] = grad @ w                          # (c, H)
                if want_weight and dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h)                                 # (V, H), in place
                elif want_weight:
                    grad_weight += grad.T @ h  # a (V, H) bf16 temporary: addmm_ cannot mix dtypes
                del grad  # bf16: its half-size copy, gone before the next chunk's logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        # Scaled in place: no second (V, H) copy. A second backward through this graph raises
        # autograd's "modified by an inplace operation" error instead of returning wrong gradients.
        grad_hidden, grad_weight, grad_bias = (g.mul_(grad_output) if g is not None else None
                                               for g in ctx.saved_tensors)
        weight_dtype, bias_dtype = ctx.dtypes
        return grad_hidden, _cast(grad_weight, weight_dtype), _cast(grad_bias, bias_dtype), None, None, None, None


def _cast(grad: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """A float32-accumulated gradient in its parameter's dtype (a no-op for float32 masters)."""
    return grad.to(dtype) if grad is not None else None


def _linear_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """out (c, V) float32 <- F.linear(h, w, b); written in place when the product is float32,
    else computed in h's dtype (bf16 under autocast) and copied in."""
    if h.dtype != torch.float32:
        return out.copy_(F.linear(h, w, b))
    return torch.addmm(b, h, w.T, out=out) if b is not None else torch.mm(h, w.T, out=out)


def _checkpointed_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int,
                         softcap: float | None) -> torch.Tensor:
    """Any head module, called on `chunk` rows at a time under activation checkpointing: forward
    keeps no logits, backward recomputes one chunk's (dropout included: RNG state is replayed)."""
    parts = [checkpoint(plain_ce_sum, hidden[lo:lo + chunk], targets[lo:lo + chunk], head, softcap,
                        use_reentrant=False) for lo in range(0, hidden.shape[0], chunk)]
    return torch.stack(parts).sum()


def plain_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                 softcap: float | None = None) -> torch.Tensor:
    """The plain loss, the reference for the others: full (N, V) float32 logits (autocast may
    compute them in bf16), then F.cross_entropy summed. Holds every logit; fine for one chunk."""
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


@torch.no_grad()
def linear_ce_scores(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int = DEFAULT_CHUNK,
                     softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation's per-position view of the same loss: (N,) float32 CE and (N,) bool "argmax is the
    target", `chunk` rows of logits at a time (float32, as in training's loss)."""
    losses, hits = [], []
    for lo in range(0, hidden.shape[0], chunk):
        logits = head(hidden[lo:lo + chunk]).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        losses.append(F.cross_entropy(logits, targets[lo:lo + chunk], reduction="none"))
        hits.append(logits.argmax(-1) == targets[lo:lo + chunk])
    if not losses:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(losses), torch.cat(hits)
