"""NEFTune: uniform noise on input embeddings while training (Jain et al., 2023).

noise ~ U(-1, 1) * alpha / sqrt(L * d), with L the length of the *example* a token belongs
to. The reference implementation uses the padded/packed row length, so an example packed
into a 2048-token row gets sqrt(2048 / L) times less noise than it would alone; here the
scale is per token, from `seq_lens`.

    with neftune(model, alpha=5.0) as set_lengths:
        set_lengths(batch["seq_lens"], batch["input_ids"].shape)   # before each forward
        loss = ...
"""

from __future__ import annotations

import contextlib

import torch


def noise_scale(seq_lens: list[list[int]], shape: tuple[int, int], alpha: float, dim: int) -> torch.Tensor:
    """(B, T) per-token magnitude alpha / sqrt(L * d); 0 on padding (positions past the examples)."""
    scale = torch.zeros(shape, dtype=torch.float32)
    for row, lengths in enumerate(seq_lens):
        offset = 0
        for n in lengths:
            scale[row, offset:offset + n] = alpha / (n * dim) ** 0.5
            offset += n
    return scale


@contextlib.contextmanager
def neftune(model, alpha: float):
    """Hook the input embeddings; yields `set_lengths(seq_lens, shape)` to call before each forward."""
    if alpha <= 0:
        yield lambda seq_lens, shape: None
        return
    embeddings = model.get_input_embeddings()
    state: dict = {}

    def set_lengths(seq_lens, shape):
        scale = noise_scale(seq_lens, tuple(shape), alpha, embeddings.weight.shape[1])
        where = embeddings.weight.device
        # Page-locked, so the copy to the GPU does not stall it (a pageable copy syncs the stream).
        state["scale"] = scale.pin_memory().to(where, non_blocking=True) if where.type == "cuda" else scale

    def hook(module, inputs, output):
        if not module.training or "scale" not in state:  # never in eval or generation
            return output
        scale = state["scale"].to(output.device, output.dtype).unsqueeze(-1)
        return output + torch.empty_like(output).uniform_(-1, 1) * scale

    handle = embeddings.register_forward_hook(hook)
    try:
        yield set_lengths
    finally:
        handle.remove()
