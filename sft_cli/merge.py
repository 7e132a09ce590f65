"""`sft merge-lora`: fold the run's LoRA adapter into its base model and save a plain HF model.

    sft merge-lora run_dir=runs/demo              # -> runs/demo/merged/
    sft merge-lora run_dir=runs/demo merge.force=true

The merge happens in the base's own dtype. Before anything is written, the merged model's logits
are compared with base+adapter on sample inputs from the run's data; a difference beyond the
dtype's tolerance is an error and nothing is written. merged/ holds safetensors (sharded by
merge.max_shard_size), the tokenizer with its chat template and final/'s generation config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sft_cli import console as ui
from sft_cli.artifacts import atomic_dir, write_manifest
from sft_cli.config import SFTConfig, run_config
from sft_cli.errors import ConfigError, SFTError

# max |merged - (base + adapter)| allowed, relative to the largest logit: float32 merges are exact up to
# summation order; half precision rounds the merged weights once more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def run(cfg: SFTConfig) -> int:
    cfg = run_config(cfg)
    run_dir = Path(cfg.run_dir)
    final, out = run_dir / "final", run_dir / "merged"
    if not (final / "manifest.json").exists():
        raise SFTError(f"no trained model in {final}: train first (sft train)")
    if not (final / "adapter_config.json").exists():
        raise SFTError(f"{final} holds a fully fine-tuned model (peft=none), not an adapter: it is already a "
                       "plain model, load it with AutoModelForCausalLM.from_pretrained")
    if out.exists() and not cfg.merge.force:
        raise ConfigError("merge.force", f"{out} already exists", "pass merge.force=true to overwrite it")

    tokenizer, base = load_base(cfg, final)
    samples = sample_inputs(run_dir, tokenizer)
    adapted = attach_adapter(base, final, cfg)
    with torch.no_grad():
        reference = [adapted(input_ids=ids, use_cache=False).logits.float() for ids in samples]
        merged = adapted.merge_and_unload()
        got = [merged(input_ids=ids, use_cache=False).logits.float() for ids in samples]
    diff = max((a - b).abs().max().item() for a, b in zip(got, reference))
    scale = max(r.abs().max().item() for r in reference)
    tolerance = TOLERANCE.get(merged.dtype, 5e-2) * max(scale, 1.0)
    check = {"dtype": str(merged.dtype).removeprefix("torch."), "max_abs_diff": diff, "tolerance": tolerance,
             "logit_scale": scale, "inputs": len(samples)}
    if not diff <= tolerance:
        raise SFTError(f"merged logits differ from base+adapter by {diff:.3g} (tolerance {tolerance:.3g}); "
                       "nothing written")

    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), max_shard_size=cfg.merge.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        if (final / "generation_config.json").exists():  # stops on end-of-turn, not only EOS
            shutil.copy2(final / "generation_config.json", tmp / "generation_config.json")
        write_manifest(tmp, "merged", {"stage": "merge", "verification": check, "base": cfg.model.name_or_path})
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    ui.print_merge_summary(out, check, sum(p.numel() for p in merged.parameters()), shards)
    return 0


def load_base(cfg: SFTConfig, final: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sft_cli.assets import resolve_model

    path = resolve_model(cfg.model.name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise SFTError(f"the base model {cfg.model.name_or_path} is quantised "
                       f"({config.quantization_config.get('quant_method', '?') if isinstance(config.quantization_config, dict) else 'quantised'}): "
                       "merging into quantised weights would round the adapter away. Dequantise the base first "
                       "(or point model.name_or_path at an unquantised copy)")
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    base = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=cfg.model.trust_remote_code)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=True)  # as training did
    return tokenizer, base.eval()


def attach_adapter(base, final: Path, cfg: SFTConfig):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(final)).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SFTError(f"the adapter in {final} does not fit the base model {cfg.model.name_or_path}: "
                       f"{str(exc).splitlines()[0][:200]}") from None


def sample_inputs(run_dir: Path, tokenizer, count: int = 4, length: int = 128) -> list[torch.Tensor]:
    """A few of the run's own examples (truncated), or fixed random ids when there are none."""
    import datasets

    prepared = run_dir / "prepared"
    if (prepared / "manifest.json").exists():
        splits = datasets.load_from_disk(str(prepared))
        split = splits["eval"] if "eval" in splits else splits["train"]
        rows = split.select(range(min(count, len(split))))["input_ids"]
        return [torch.tensor([list(ids)[:length]]) for ids in rows]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, len(tokenizer), (1, length), generator=generator) for _ in range(count)]


def read_verification(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["verification"]
