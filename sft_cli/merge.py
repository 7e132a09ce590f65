"""`sft merge-lora`: fold the run's LoRA adapter into its base model and save a plain HF model.

    sft merge-lora run_dir=runs/demo                                   # -> runs/demo/merged/
    sft merge-lora run_dir=runs/demo merge.force=true merge.max_shard_size=500MB

The run locates itself: run_dir/config.yaml names the base, run_dir/final/ holds the adapter,
the tokenizer (with its chat template) and the generation config that stops on end-of-turn.

  1. refuse before loading any weights: no final/, a full fine-tune, merged/ exists, a quantised base;
  2. load the base in its stored dtype, grow its embeddings if training added tokens, attach the adapter;
  3. record base+adapter logits on a few of the run's own examples, then merge (in place);
  4. save into a temp folder, reload that folder with plain AutoModelForCausalLM and compare its logits
     with step 3's: what is checked is exactly what a user or an inference server will load;
  5. manifest last, rename into place. A failed check leaves nothing behind.

merged/ holds safetensors (sharded by merge.max_shard_size), the tokenizer, chat template and
final/'s generation_config.json, and no adapter_config.json.
"""

from __future__ import annotations

import gc
import json
import shutil
import warnings
from pathlib import Path

import torch

from sft_cli import console as ui
from sft_cli.config import SFTConfig, run_config
from sft_cli.errors import ConfigError, SFTError, remote_code_refusal
from sft_cli.run_dir import atomic_dir, fingerprint, hash_file, write_manifest

# How far merged may be from base + adapter, per dtype: (max |diff| as a fraction of the largest
# |logit| (at least 1), RMS of the diff as a fraction of the logits' standard deviation). float32 is
# exact up to summation order. In bf16/fp16 both forwards round every activation, and that alone
# moves single logits by whole units: on SmolLM2-135M in bf16, base + adapter run in bf16 vs in
# float32 differ by up to 1.4 at a logit scale of 34 (RMS 4% of the spread), and merged vs base +
# a strong random adapter by up to 7.4 at one position (RMS 3-10%). So half precision is judged mainly
# on the RMS: these bounds catch a broken merge or save (garbage rows, a lost head: RMS near 100%),
# not an adapter too small to see through bf16's own noise.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (0.1, 0.05), torch.bfloat16: (0.5, 0.2)}
SAMPLES, SAMPLE_LEN = 4, 128


def run(cfg: SFTConfig) -> int:
    cfg = run_config(cfg)
    run_dir = Path(cfg.run_dir)
    final, out = run_dir / "final", run_dir / "merged"
    check_mergeable(final, out, cfg)
    tokenizer, base = load_base(cfg, final)
    tied = tied_embeddings(base)
    adapted = attach_adapter(base, final, cfg)
    samples = sample_inputs(run_dir, len(tokenizer))
    # Before merging: merge_and_unload rewrites the base weights in place, so this is the last
    # moment base + adapter exists.
    reference = logits(adapted, samples)
    with warnings.catch_warnings():
        # "embeddings are no longer tied": reported in the summary instead (see below).
        warnings.filterwarnings("ignore", message=".*no longer tied.*")
        merged = adapted.merge_and_unload()
    if any(tag in name for name, _ in merged.named_parameters() for tag in ("lora_", "modules_to_save")):
        raise SFTError("peft left LoRA layers in the merged model; nothing written")
    untied = tied and not tied_embeddings(merged)
    parameters = sum(p.numel() for p in merged.parameters())

    with atomic_dir(out) as tmp:
        save_merged(merged, tokenizer, final, tmp, cfg.merge.max_shard_size)
        del base, adapted, merged  # the reload below should not hold two models in memory
        gc.collect()
        reloaded = load_plain(tmp, cfg)
        check = {**compare(logits(reloaded, samples), reference, reloaded.dtype), "inputs": len(samples)}
        if not check["ok"]:
            raise SFTError(f"the merged model's logits differ from base + adapter: {describe(check)}; "
                           "nothing written")
        shards = sorted(p.name for p in tmp.glob("*.safetensors"))
        adapter_files = [hash_file(path) for path in sorted(final.glob("adapter_model.*"))]
        write_manifest(tmp, fingerprint(adapter_files, cfg.model.name_or_path),
                       {"stage": "merge", "base": cfg.model.name_or_path, "adapter": str(final),
                        "parameters": parameters, "shards": shards, "verification": check})
    ui.print_merge_summary(out, check, parameters, shards)
    if check["dtype"] != "float32":  # judged mainly on the RMS there (see TOLERANCE)
        ui.out.print(f"RMS of the difference: {100 * check['rms_rel']:.2g}% of the logits' spread (tolerance "
                     f"{100 * check['rms_tolerance']:.2g}% in {check['dtype']})")
    if untied:
        ui.out.print("note: the adapter trained the embeddings and the LM head separately, so merged/ keeps "
                     "them as two matrices (tie_word_embeddings=false)")
    return 0


def check_mergeable(final: Path, out: Path, cfg: SFTConfig) -> None:
    """Every refusal that needs no model loaded."""
    if not (final / "manifest.json").is_file():
        raise SFTError(f"no trained model in {final}: train first (sft train run_dir={final.parent} ...)")
    if not (final / "adapter_config.json").is_file():
        raise SFTError(f"{final} holds a fully fine-tuned model (peft=none), not an adapter: there is nothing "
                       "to merge, it is already a plain model (AutoModelForCausalLM.from_pretrained"
                       f"('{final}'))")
    if out.exists() and not cfg.merge.force:
        raise ConfigError("merge.force", f"{out} already exists", "pass merge.force=true to replace it")


def quantisation(config) -> str | None:
    """The quantisation method a model config declares, or None for plain weights."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown method")


def load_base(cfg: SFTConfig, final: Path):
    """(final/'s tokenizer, the base model in its stored dtype with embeddings as wide as that tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sft_cli.assets import resolve_model

    name = cfg.model.name_or_path
    path = resolve_model(name)
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code, "revision": cfg.model.revision}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        method = quantisation(config)
        if method:
            raise SFTError(f"the base model {name} is quantised ({method}): merging would round the adapter's "
                           "update into quantised weights and lose most of it. Dequantise the base first (or "
                           "point model.name_or_path in the run's config.yaml at an unquantised copy)")
        tokenizer = AutoTokenizer.from_pretrained(str(final))
        base = AutoModelForCausalLM.from_pretrained(path, dtype="auto", **kwargs)
    except (OSError, ValueError) as exc:
        raise remote_code_refusal(f"the base model '{name}'", exc) or SFTError(
            f"cannot load the base model '{name}': {reason(exc)}") from None
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        # Training added tokens (a template's markers) and grew the embeddings the same way; the
        # adapter's modules_to_save then carry the trained rows, which replace these new ones.
        require_saved_embeddings(base, final)
        base.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return tokenizer, base.eval()


def require_saved_embeddings(base, final: Path) -> None:
    """Rows for added tokens start random (mean_resizing samples them): unless the adapter saved the
    trained embeddings and head, the tokens' trained rows are gone and a merge would invent new ones."""
    wanted = {id(base.get_input_embeddings()), id(base.get_output_embeddings())}
    needed = {name.rsplit(".", 1)[-1] for name, module in base.named_modules() if id(module) in wanted}
    saved = set(json.loads((final / "adapter_config.json").read_text()).get("modules_to_save") or [])
    if not needed <= saved:
        raise SFTError(f"final/'s tokenizer has tokens the base model lacks, but the adapter does not carry the "
                       f"trained {' and '.join(sorted(needed - saved))} (modules_to_save: {sorted(saved)}): the "
                       "added tokens' trained rows are lost. Retrain with peft.modules_to_save unset (the "
                       "default saves them) or listing them")


def attach_adapter(base, final: Path, cfg: SFTConfig):
    from peft import PeftModel

    trained_on = json.loads((final / "adapter_config.json").read_text()).get("base_model_name_or_path")
    misfit = (f"the adapter in {final} does not fit the base model {cfg.model.name_or_path}", f"It was trained "
              f"on {trained_on}: point model.name_or_path in the run's config.yaml at that model")
    try:
        with warnings.catch_warnings():
            # Training-time advice about tied embeddings; nothing to act on at merge time.
            warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
            adapted = PeftModel.from_pretrained(base, str(final)).eval()
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatches, target modules missing
        raise SFTError(f"{misfit[0]} ({reason(exc)}). {misfit[1]}") from None
    left_out = unloaded_weights(adapted, final)
    if left_out:
        raise SFTError(f"{misfit[0]}: {len(left_out)} of the adapter's weights have no place in it (e.g. "
                       f"{left_out[0]}). {misfit[1]}")
    return adapted


def unloaded_weights(adapted, final: Path) -> list[str]:
    """Adapter weights the model did not take. peft loads with strict=False, so an adapter for a deeper
    model attaches to a shallower one without a word, and its extra layers are silently dropped."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    path = final / "adapter_model.safetensors"
    if not path.is_file():
        return []
    with safe_open(str(path), "pt") as handle:
        saved = set(handle.keys())
    # Named the way save_pretrained names them; embedding layers included, so none is missed.
    loaded = set(get_peft_model_state_dict(adapted, save_embedding_layers=True))
    return sorted(saved - loaded)


def reason(exc: Exception) -> str:
    """The telling line of a library error (load_state_dict's first line is a bare header)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    details = [line for line in lines if not line.endswith(":")] or lines or [type(exc).__name__]
    return details[0][:300] + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")


def tied_embeddings(model) -> bool:
    """Input and output embeddings share one matrix (peft trains them as two copies and unties them)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def sample_inputs(run_dir: Path, vocab_size: int) -> list[torch.Tensor]:
    """A few of the run's own examples, cut to SAMPLE_LEN tokens (eval split first: it has the
    template's markers like training did); fixed random ids when the run has no prepared data."""
    import datasets

    prepared = run_dir / "prepared"
    if (prepared / "manifest.json").is_file():
        splits = datasets.load_from_disk(str(prepared))
        for name in ("eval", "train"):
            if name in splits and len(splits[name]):
                rows = splits[name].select(range(min(SAMPLES, len(splits[name]))))["input_ids"]
                return [torch.tensor([list(ids)[:SAMPLE_LEN]]) for ids in rows if len(ids)]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, SAMPLE_LEN), generator=generator) for _ in range(SAMPLES)]


@torch.no_grad()
def logits(model, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids, use_cache=False).logits.float() for ids in samples]  # each (1, T, vocab)


def compare(got: list[torch.Tensor], reference: list[torch.Tensor], dtype: torch.dtype) -> dict:
    """merged's logits vs base + adapter's, judged by `dtype`'s TOLERANCE. Returns {ok, dtype,
    max_abs_diff, tolerance, logit_scale, rms_rel, rms_tolerance}."""
    max_rel, rms_allowed = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    diff_max = max((a - b).abs().max().item() for a, b in zip(got, reference))
    scale = max(r.abs().max().item() for r in reference)
    # Sums in float64 over all samples (each (1, T, vocab)), so no (N, T, vocab) tensor is built.
    count = sum(r.numel() for r in reference)
    diff_sq = sum((a.double() - b.double()).pow(2).sum().item() for a, b in zip(got, reference))
    mean = sum(r.double().sum().item() for r in reference) / count
    var = sum((r.double() - mean).pow(2).sum().item() for r in reference) / count
    rms_rel = (diff_sq / count) ** 0.5 / max(var ** 0.5, 1e-12)
    allowed = max_rel * max(scale, 1.0)
    # Written as `<=` so that a NaN anywhere fails the check.
    return {"ok": diff_max <= allowed and rms_rel <= rms_allowed, "dtype": str(dtype).removeprefix("torch."),
            "max_abs_diff": diff_max, "tolerance": allowed, "logit_scale": scale, "rms_rel": rms_rel,
            "rms_tolerance": rms_allowed}


def describe(check: dict) -> str:
    return (f"max |diff| {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g} in {check['dtype']} at "
            f"logit scale {check['logit_scale']:.3g}), RMS diff {100 * check['rms_rel']:.2g}% of the logits' "
            f"spread (tolerance {100 * check['rms_tolerance']:.2g}%)")


def save_merged(model, tokenizer, final: Path, folder: Path, max_shard_size: str) -> None:
    # Config ids as training set them (model.load_model), so config.json agrees with the tokenizer.
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(tokenizer, key) is not None:
            setattr(model.config, key, getattr(tokenizer, key))
    model.config.use_cache = True  # an inference model: keep the KV cache on
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(folder))
    if (final / "generation_config.json").is_file():
        # final/'s stops on every end-of-turn token of the template, not only on EOS.
        shutil.copy2(final / "generation_config.json", folder / "generation_config.json")
    # safetensors writes its files 0600; an inference server running as another user must read them.
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def load_plain(folder: Path, cfg: SFTConfig):
    """The saved folder as a user loads it: transformers only, no peft, its stored dtype."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto",
                                                    trust_remote_code=cfg.model.trust_remote_code).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise SFTError(f"the merged model does not load back ({reason(exc)}); "
                       "nothing written") from None
