"""The model for a run: load, match the tokenizer, pick an attention backend that keeps
packed examples apart, and wrap it with LoRA (peft) or leave it whole.

    model, info = load_model(cfg, tokenizer)        # info: dtype, attn backend, trainable params
    loss_sum = SFTModel(model)(**model_inputs(batch), target_index=..., targets=...)
"""

from __future__ import annotations

import torch

from sft_cli.config import ModelConfig, SFTConfig
from sft_cli.errors import ConfigError, load_error
from sft_cli.precision import pick_dtype


def pick_attention(name: str, training: bool = True, dtype: torch.dtype | None = None) -> str:
    """`auto`: flash varlen on a GPU computing in bf16/fp16 when flash_attn is installed, else SDPA
    (both isolate packed examples). Flash kernels have no float32 path, so a float32 model on a GPU
    (tiny and debugging configs) gets SDPA. A named backend (one of config.ATTENTION_BACKENDS, as
    validate() checked) is refused only where this machine or dtype cannot run it."""
    on_gpu = torch.cuda.is_available()
    if name == "auto":
        # flash-attn 2 runs on Ampere and newer only; older GPUs get SDPA.
        if on_gpu and dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability()[0] >= 8:
            try:
                import flash_attn  # noqa: F401

                return "flash_attention_2"
            except ImportError:
                pass
        return "sdpa"
    if name == "flex_attention" and not on_gpu and training:
        raise ConfigError("model.attn_implementation", "flex_attention has no backward pass on CPU",
                          "use sdpa (or eager) on CPU")
    if name.startswith("flash_attention") and not on_gpu:
        raise ConfigError("model.attn_implementation", f"{name} needs a CUDA GPU", "use sdpa on CPU")
    if name.startswith("flash_attention") and dtype == torch.float32:
        raise ConfigError("model.attn_implementation", f"{name} has no float32 kernels",
                          "use model.dtype=bfloat16, or attn_implementation=sdpa")
    return name


class SFTModel(torch.nn.Module):
    """The model as training and evaluation run it: decoder body -> LM head on trained positions
    only -> cross-entropy. It is the unit DDP and FSDP2 wrap.

    forward() returns the summed CE of a micro-batch (0-dim float32); with per_token=True, the
    (N,) CE and (N,) "argmax is right" of every trained position instead (evaluation, no grad).

    The head runs fused with the cross-entropy a chunk at a time (loss.linear_ce_sum: one chunk's
    logits alive at once), so the forward goes body -> loss here instead of through the model's own
    forward (which would build the full (B, T, vocab) logits). Wrapping this module, not the model,
    keeps DDP's gradient hooks and FSDP2's unshard hooks on the path that is actually called.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)

    def forward(self, input_ids, position_ids, target_index, targets, per_token: bool = False, **varlen):
        from sft_cli.loss import linear_ce_scores, linear_ce_sum

        # use_cache=False: with a KV cache transformers would not build the packed (block) mask.
        hidden = decoder(self.model)(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                     **varlen).last_hidden_state
        # index_select with indices from the collator: no boolean mask, so no host-device sync.
        picked = hidden.flatten(0, 1).index_select(0, target_index)
        score = linear_ce_scores if per_token else linear_ce_sum
        return score(picked, targets, lm_head(self.model), softcap=self.softcap)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (FSDP2 shards each as its own group)."""
    body = decoder(model)
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(body, name, None), torch.nn.ModuleList):
            return list(getattr(body, name))
    return []


def decoder(model):
    """The transformer body (no LM head) under any peft/DDP wrapping."""
    return unwrap(model).get_decoder()


def lm_head(model):
    return unwrap(model).get_output_embeddings()


def unwrap(model):
    """LlamaForCausalLM (etc.) from inside DDP / FSDP / peft wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def load_model(cfg: SFTConfig, tokenizer, path: str, *, empty: bool = False, masters: bool = True):
    """The model to train, on the CPU, each weight stored as precision.py assigns: float32
    masters for what trains, the compute dtype (`model.dtype`) for a frozen LoRA base.

    empty=True builds the same model on the meta device without reading a weight: FSDP2 ranks
    shard that, then receive the weights from rank 0 (distributed.load_sharded).
    masters=False: rank 0's copy that FSDP2 ranks receive their shards from. Full fine-tuning keeps
    every weight as the checkpoint stores it (bf16 for most: exact float32 masters, and never the
    whole model in float32 unless the file is); LoRA reads its base in the compute dtype, so its
    adapters start exactly as in one process.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_cli.assets import resolve_model
    from sft_cli.precision import upcast_trainable

    compute = pick_dtype(cfg.model.dtype)
    attn = pick_attention(cfg.model.attn_implementation, dtype=compute)
    full_finetune = cfg.peft.method == "none"
    if masters:
        dtype = torch.float32 if full_finetune else compute
    else:  # full FT: as the file stores them (exact masters); LoRA: the base as every other path has it
        dtype = "auto" if full_finetune else compute
    options = {"trust_remote_code": cfg.model.trust_remote_code, "revision": cfg.model.revision}
    try:
        if empty:
            config = AutoConfig.from_pretrained(resolve_model(path), **options)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn,
                                                         trust_remote_code=cfg.model.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=dtype,
                                                         attn_implementation=attn, **options)
    except (OSError, ValueError) as exc:
        raise load_error(f"model '{path}'", exc, "Offline? Set model.name_or_path to a local folder.") from None
    model.config.use_cache = False  # a KV cache would switch off packed-sequence masking
    added_tokens = len(tokenizer) > model.get_input_embeddings().weight.shape[0]
    if added_tokens:
        # New rows start at the mean of the old ones: a new token begins as "an average token"
        # instead of noise that would spike the first losses. (On meta there is nothing to average:
        # those rows arrive from rank 0.)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not empty)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, key)
        if value is not None:
            setattr(model.config, key, value)
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.peft.method != "none":
            model.enable_input_require_grads()
    model = apply_peft(cfg, model, added_tokens)
    if masters:
        upcast_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    stored = lambda trained: "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()  # noqa: E731
                                               if p.requires_grad == trained}))
    return model, {"dtype": str(compute).removeprefix("torch."), "trainable_dtype": stored(True),
                   "frozen_dtype": stored(False),
                   "attn_implementation": attn, "trainable_params": trainable, "total_params": total,
                   "added_tokens": added_tokens}


def _embedding_module_names(model) -> list[str]:
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in wanted})


def apply_peft(cfg: SFTConfig, model, added_tokens: bool):
    if cfg.peft.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    modules_to_save = cfg.peft.modules_to_save
    if modules_to_save is None and added_tokens:
        # New tokens need trainable embeddings (and head), or their rows stay at the mean forever.
        modules_to_save = _embedding_module_names(model)
    target = cfg.peft.target_modules
    config = LoraConfig(
        r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        use_dora=cfg.peft.use_dora, use_rslora=cfg.peft.use_rslora,
        modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_for_inference(model_cfg: ModelConfig, tokenizer, path=None, run_cfg: SFTConfig | None = None):
    """For evaluation and generation: the base (path None), a full model folder, or an adapter folder on
    top of the base, on the run's device in its compute dtype (no training here, so no float32 master
    weights). An adapter's own weights stay float32 as peft keeps them in training, so the tuned model
    computes as it did there. A training checkpoint (checkpoints/step-N: trainable.safetensors only) is
    rebuilt as training built it, from its run's config (`run_cfg`), with the checkpoint's weights."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from sft_cli import distributed
    from sft_cli.assets import resolve_model

    if path is not None and is_training_checkpoint(Path(path)):
        return _checkpoint_for_inference(run_cfg, tokenizer, Path(path))

    dtype = pick_dtype(model_cfg.dtype)
    kwargs = {"dtype": dtype, "attn_implementation": pick_attention(model_cfg.attn_implementation, training=False,
                                                                     dtype=dtype),
              "trust_remote_code": model_cfg.trust_remote_code}
    is_adapter = path is not None and (Path(path) / "adapter_config.json").is_file()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model(model_cfg.name_or_path) if path is None or is_adapter else str(path), **kwargs)
        model.to(distributed.device())
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        if is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise load_error(str(path or model_cfg.name_or_path), exc) from None
    model.config.use_cache = False
    return model.eval()


def is_training_checkpoint(folder) -> bool:
    from pathlib import Path

    folder = Path(folder)
    return (folder / "trainable.safetensors").is_file() and not (folder / "config.json").is_file() \
        and not (folder / "adapter_config.json").is_file()


def _checkpoint_for_inference(run_cfg: SFTConfig | None, tokenizer, folder):
    import copy

    from safetensors.torch import load_file

    from sft_cli import distributed
    from sft_cli.checkpoint import load_trainable_state
    from sft_cli.errors import SFTError

    if run_cfg is None:
        raise SFTError(f"{folder} is a training checkpoint: it loads only with its run's config.yaml "
                       "(give the checkpoint inside its run_dir, or use the run's final/)")
    cfg = copy.deepcopy(run_cfg)
    cfg.trainer.gradient_checkpointing = False  # inference: nothing to recompute
    model, _ = load_model(cfg, tokenizer, cfg.model.name_or_path)
    load_trainable_state(model, load_file(str(folder / "trainable.safetensors")))
    model.to(distributed.device())
    model.requires_grad_(False)
    return model.eval()
