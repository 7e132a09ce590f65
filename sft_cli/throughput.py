"""How well a step used the machine: model FLOPs utilisation (MFU) and peak memory.

    model FLOPs of a step = k x (non-embedding params + vocab x hidden) x real tokens
                            + 6 x layers x (heads x head_dim) x sum over examples of n^2
    MFU = model FLOPs / step seconds / the device's peak FLOP/s in the compute dtype

k = 6 for full fine-tuning (forward 2, backward 2 for activations + 2 for weights), 4 with LoRA
(frozen weights need no weight gradient). The LM head counts on every token, as in the PaLM
definition, although `sft` runs it only on trained positions: MFU measures the model's useful work,
not the kernels that ran. Causal attention (QK^T and AV, forward and backward) counts each example
against itself only, as packing computes it. Padding counts nothing.

Peak FLOP/s: dense tensor-core numbers of common GPUs from their datasheets (TF32 for float32
compute); any other device (CPUs, unlisted GPUs) is measured once with a matmul in the compute dtype.

    flops = model_flops(config, tokens=8192, attention=sum_sq, lora=False)
    mfu = flops / seconds / peak_flops(device, torch.bfloat16)
"""

from __future__ import annotations

import functools
import resource
import time

import torch

# Dense (not 2:4 sparse) peak TFLOP/s per GPU: (bf16/fp16, tf32). Matched against the device name.
GPU_PEAK_TFLOPS = {
    "B200": (2250, 1100), "H200": (989, 494), "H100 PCIe": (756, 378), "H100": (989, 494), "H800": (989, 494),
    "GH200": (989, 494), "A100": (312, 156), "A800": (312, 156), "L40S": (362, 183), "L40": (181, 90),
    "L4": (121, 60), "A10G": (70, 35), "A10": (125, 62), "RTX 4090": (165, 83), "RTX 3090": (71, 36),
    "V100": (125, 16), "T4": (65, 8),
}


def model_flops(config, tokens: int, attention: float, lora: bool) -> float:
    """Training FLOPs of `tokens` real tokens whose examples' squared lengths sum to `attention`."""
    config = config.get_text_config()  # multimodal configs (Gemma 3) keep the decoder's numbers there
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    gated = 3 if getattr(config, "hidden_act", "silu") in ("silu", "swish", "gelu_pytorch_tanh") else 2
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + gated * hidden * inner
    weights = layers * per_layer + config.vocab_size * hidden  # + the LM head
    return (4 if lora else 6) * weights * tokens + 6 * layers * heads * head_dim * attention


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAK_TFLOPS.items():  # longest names first where they overlap
            if key in name:
                return (tf32 if dtype == torch.float32 else half) * 1e12
    return _measured_peak(device.type, device.index, dtype)


@functools.cache
def _measured_peak(kind: str, index: int | None, dtype: torch.dtype) -> float:
    """Best of a few square matmuls: the FLOP/s this device reaches in `dtype` (CPUs: ~0.1 s)."""
    device = torch.device(kind, index) if index is not None else torch.device(kind)
    size = 4096 if kind == "cuda" else 1024
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)  # values do not change the speed
    best = float("inf")
    for _ in range(5):
        _sync(device)
        started = time.perf_counter()
        a @ a
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory tensors held since the last call (then reset, so it is per step).
    CPU: the process's resident-set high-water mark so far (the OS keeps no per-step peak)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
