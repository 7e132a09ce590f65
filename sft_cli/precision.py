"""Mixed precision: which dtype each thing is stored in, and which dtype each thing runs in.

`model.dtype` names the compute dtype. What is stored follows from it:

                                  model.dtype=bfloat16 (GPU default)      float32 (CPU default)
    trainable weights, AdamW      float32 master copies                   float32
    frozen weights (LoRA base)    bfloat16 (half the memory, never        float32
                                  updated, so nothing to round away)
    matmuls, activations          bfloat16 (torch.autocast; under FSDP2   float32 (TF32 on GPUs)
                                  also its MixedPrecisionPolicy)
    loss (log-softmax, CE)        float32                                 float32
    gradient all-reduce           float32                                 float32

Why float32 masters: a bfloat16 weight has 8 bits of mantissa, so an update smaller than
w / 256 rounds to nothing; at lr 1e-5 AdamW's steps (about lr per weight) are far below that for
most weights, and pure-bf16 training silently stops learning. float16 is as bfloat16 plus a
gradient scaler: its 5-bit exponent flushes small gradients to zero unless the loss is scaled up
first (and steps with overflowed gradients are skipped while the scale comes down).

    precision = Precision.of(cfg.model.dtype, device)
    with precision.autocast():
        loss = parallel_model(...)
    precision.backward(loss)
    precision.unscale(optimizer)                 # before clipping: clip the true gradients
    precision.step(optimizer)                    # or precision.skip() when the gradients are not finite
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sft_cli import config

# model.dtype's names (config.py owns them) -> torch dtypes.
DTYPES = {name: getattr(torch, name) for name in config.DTYPES}


def pick_dtype(name: str) -> torch.dtype:
    """The compute dtype `model.dtype` names (auto: bf16 on GPUs that have it, fp16 on older
    GPUs, float32 on CPUs, where bf16 matmuls are slow or emulated on most and float32 is exact)."""
    if name == "auto":
        if torch.cuda.is_available():
            # Native bf16 only (Ampere on): emulated bf16 on a V100 / T4 is far slower than float16.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float32
    return DTYPES[name]  # config.validate() admitted only these names


@dataclass
class Precision:
    compute: torch.dtype
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def of(cls, dtype_name: str, device: torch.device) -> Precision:
        compute = pick_dtype(dtype_name)
        if device.type == "cuda" and compute == torch.float32:
            # TF32 tensor cores for float32 matmuls: ~8x the throughput, 10-bit mantissa products
            # accumulated in float32 (the trade every float32 GPU recipe makes).
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        scaler = torch.amp.GradScaler(device.type) if compute == torch.float16 else None
        return cls(compute, device.type, scaler)

    @property
    def mixed(self) -> bool:
        return self.compute != torch.float32

    def autocast(self):
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        """optimizer.step() (with a scaler: through it, then the scale may grow)."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def skip(self) -> float | None:
        """A step that will not update (non-finite gradients or loss). With a scaler, `update()` still
        runs: the overflow unscale_ recorded halves the scale, and the next unscale_ is allowed. Returns
        the new scale while it can still come down (>= 1), None otherwise (and without a scaler)."""
        if not self.scaler:
            return None
        self.scaler.update()
        scale = self.scaler.get_scale()
        return scale if scale >= 1 else None

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def upcast_trainable(model: torch.nn.Module) -> None:
    """float32 master copies of every trainable weight (frozen ones stay in the compute dtype)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
