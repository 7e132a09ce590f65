"""`sft evaluate`: one honest evaluation of a trained run, base vs tuned in one report.

    sft evaluate run_dir=runs/demo                       # run_dir/final on the run's eval split
    sft evaluate recipe=demo eval.model=runs/demo/checkpoints/step-12 eval.num_prompts=8

What it measures, with the run's own template, masking and packing (read from run_dir/config.yaml):
  loss / perplexity / token accuracy   on the eval split (or eval.sources), overall and per source
  generations                          greedy + sampled replies to eval prompts, stopping at end-of-turn;
                                       how often a reply stops on its own vs hits max_new_tokens
  forgetting                           perplexity on general text, base vs tuned
  diversity                            distinct-1 / distinct-2 and mean length of sampled replies, base vs tuned

Both models run on the run's device (cuda:LOCAL_RANK, else CPU) in the run's compute dtype
(model.dtype), and are scored in training's batch layout for the run's attention backend; report.json
says which device and dtype it used.

Writes run_dir/eval/: report.json, generations.jsonl, comparison.png (atomically, manifest last).
"""

from __future__ import annotations

import copy
import gc
import json
from pathlib import Path

import datasets
import numpy as np
import torch

from sft_cli import console as ui
from sft_cli import distributed
from sft_cli.config import Format, SFTConfig, run_config
from sft_cli.data.chat import OPENER
from sft_cli.data.collate import VARLEN_BACKENDS, Collator
from sft_cli.data.packing import IGNORE_INDEX, position_ids
from sft_cli.errors import ConfigError, SFTError
from sft_cli.model import SFTModel, load_for_inference, pick_dtype, unwrap
from sft_cli.run_dir import atomic_dir, is_complete, write_json_atomic, write_manifest
from sft_cli.sampling import stop_token_ids
from sft_cli.scoring import Scores, distinct_n, score


def run(cfg: SFTConfig) -> int:
    from sft_cli.pack import ensure_packed
    from sft_cli.prepare import load_prepared_tokenizer

    cfg = run_config(cfg)
    run_dir = Path(cfg.run_dir)
    target = Path(cfg.eval.model) if cfg.eval.model else run_dir / "final"
    if not target.exists():
        raise SFTError(f"nothing to evaluate at {target}: train first (sft train), or set eval.model to a "
                       "checkpoint, adapter or model folder")
    if not is_complete(run_dir / "prepared"):
        ensure_packed(cfg)  # evaluating a model on a run that was never prepared here
    tokenizer = load_prepared_tokenizer(run_dir / "prepared")
    examples = eval_examples(cfg)
    prompts = eval_prompts(cfg, tokenizer, examples)
    general = general_text_ids(cfg, tokenizer)
    stop_ids = stop_token_ids(tokenizer, run_dir / "prepared")

    where = distributed.device()
    report = {"target": str(target), "base": cfg.model.name_or_path, "device": str(where),
              "dtype": str(pick_dtype(cfg.model.dtype)).removeprefix("torch."), "models": {}}
    generations = []
    models = [("tuned", target)] + ([("base", None)] if cfg.eval.compare_base else [])
    for name, path in models:
        model = load_for_inference(cfg.model, tokenizer, path, run_cfg=cfg)
        ui.err.print(f"evaluating {name}: {path or cfg.model.name_or_path}")
        result = split_metrics(model, examples, cfg.eval.micro_batch_size, max_seq_len=cfg.max_seq_len)
        result["forgetting_ppl"] = split_metrics(model, general, cfg.eval.micro_batch_size,
                                                 max_seq_len=cfg.max_seq_len)["ppl"]
        replies = generate_replies(model, tokenizer, prompts, cfg, stop_ids)
        result["generation"] = reply_stats(replies)
        generations += [{"model": name, **r} for r in replies]
        report["models"][name] = result
        del model  # free it before the next model loads onto the same device
        if where.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    report["harness"] = run_harness(cfg, target)
    report["comparison"] = compare(report["models"])

    out = run_dir / "eval"
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "report.json", report)
        with open(tmp / "generations.jsonl", "w") as handle:
            for row in generations:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        from sft_cli.plot import comparison

        comparison(report, tmp / "comparison.png")
        write_manifest(tmp, "eval", {"stage": "eval", "target": str(target)})
    ui.print_eval_report(report, generations, out)
    from sft_cli.trackers import Trackers

    with Trackers.open(cfg, run_dir) as trackers:  # the training run's trackers, when it had any
        trackers.log_report(report)
        trackers.log_image(out / "comparison.png")
    return 0


# -- data ----------------------------------------------------------------------------------------

def eval_examples(cfg: SFTConfig) -> datasets.Dataset:
    """The prepared examples to score: the run's eval split, or eval.sources prepared like training data."""
    from sft_cli import prepare

    run_dir = Path(cfg.run_dir)
    if cfg.eval.sources:
        other = copy.deepcopy(cfg)
        other.data.sources = [copy.deepcopy(s) for s in cfg.eval.sources]
        other.data.eval_fraction, other.run_dir = 0.0, str(run_dir / "eval-data")
        for source in other.data.sources:
            source.weight = None
        prepare.run(other)
        return datasets.load_from_disk(str(run_dir / "eval-data" / "prepared"))["train"]
    splits = datasets.load_from_disk(str(run_dir / "prepared"))
    if "eval" not in splits:
        raise ConfigError("data.eval_fraction", "the run has no eval split",
                          "set data.eval_fraction > 0 (and re-run prepare) or give eval.sources")
    return splits["eval"]


def eval_prompts(cfg: SFTConfig, tokenizer, examples: datasets.Dataset) -> list[dict]:
    """[{prompt_ids, prompt, reference}]: eval.prompts (a JSONL of messages or prompt rows) or the
    eval split's conversations cut before their first trained token (the first assistant reply)."""
    wanted = cfg.eval.num_prompts
    prompts = []
    if cfg.eval.prompts:
        path = Path(cfg.eval.prompts)
        if not path.is_file():
            raise ConfigError("eval.prompts", f"file not found: {path}", "give a JSONL of {messages: [...]} rows")
        for line in path.read_text().splitlines()[:wanted]:
            row = json.loads(line)
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            # return_dict: transformers 5 returns a BatchEncoding (not a dict, and not a list of ids) otherwise.
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
            prompts.append({"prompt_ids": list(ids), "reference": None})
    else:
        for row in examples.select_columns(["input_ids", "labels"]):
            labels = np.asarray(row["labels"])
            trained = np.flatnonzero(labels != IGNORE_INDEX)
            if len(trained) == 0 or trained[0] < 2 or len(trained) == len(labels) - 1:
                continue  # plain text (everything trained): no prompt to answer
            first = int(trained[0])
            end = first + int(np.argmax(labels[first:] == IGNORE_INDEX)) if (labels[first:] == IGNORE_INDEX).any() \
                else len(labels)
            prompts.append({"prompt_ids": row["input_ids"][:first], "reference": tokenizer.decode(row["input_ids"][first:end])})
            if len(prompts) == wanted:
                break
    for p in prompts:
        p["prompt"] = tokenizer.decode(p["prompt_ids"])
    return prompts


def general_text_ids(cfg: SFTConfig, tokenizer, limit: int = 64) -> list[dict]:
    """General text for the forgetting check, as examples with loss on every token: eval.general_text,
    else the held-out eval examples of the run's `text` sources, else the shipped news sample."""
    from sft_cli.assets import asset_path

    texts_sources = [s for s in cfg.data.sources if s.format == Format.text]
    if cfg.eval.general_text is None and texts_sources:
        names = {s.name or Path(s.path).stem for s in texts_sources}
        held_out = eval_examples(cfg) if not cfg.eval.sources else None
        if held_out is not None and "source" in held_out.column_names:
            rows = [r for r in held_out.select_columns(["input_ids", "source"]) if r["source"] in names][:limit]
            if rows:
                return [_all_trained(r["input_ids"]) for r in rows]
    path = Path(cfg.eval.general_text or asset_path("data/general_text.jsonl"))
    if not path.is_file():
        raise ConfigError("eval.general_text", f"file not found: {path}", "give a JSONL of {text: ...} rows")
    rows = []
    for line in path.read_text().splitlines()[:limit]:
        ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"][:cfg.max_seq_len]
        if len(ids) >= 2:
            rows.append(_all_trained(ids))
    return rows


def _all_trained(ids: list[int]) -> dict:
    return {"input_ids": list(ids), "labels": [IGNORE_INDEX] + list(ids[1:])}


# -- model ---------------------------------------------------------------------------------------

# -- loss ----------------------------------------------------------------------------------------

@torch.no_grad()
def split_metrics(model, examples, micro_batch_size: int, packed: bool = True, max_seq_len: int | None = None,
                  flat: bool | None = None) -> dict:
    """Masked loss, perplexity and token accuracy over examples, overall and per source.

    packed=True packs the examples (BFD) into rows like training does; packed=False scores each
    example alone. Both give the same numbers (the packed rows keep examples apart). `flat` is
    training's layout (data/collate.py): one (1, T) stream with varlen boundaries, or padded (B, L)
    rows; None takes it from the model's attention backend, as training does. Scored by
    scoring.score, as training's periodic eval is: the head runs on trained positions only.
    """
    from sft_cli.data.packing import bfd_bins, mask_example_starts

    rows = [dict(r) for r in examples] if not isinstance(examples, list) else examples
    if not rows:
        return Scores(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)).summary() | {"by_source": {}}
    lengths = [len(r["input_ids"]) for r in rows]
    names = sorted({r.get("source", "all") for r in rows})
    code = {name: i for i, name in enumerate(names)}
    capacity = max_seq_len or max(max(lengths), 1)
    bins = bfd_bins(lengths, capacity) if packed else [[i] for i in range(len(rows))]
    packed_rows = []
    for members in bins:
        seq_lens = [lengths[i] for i in members]
        packed_rows.append({
            "input_ids": [t for i in members for t in rows[i]["input_ids"]],
            "labels": mask_example_starts(np.concatenate([np.asarray(rows[i]["labels"]) for i in members]),
                                          seq_lens).tolist(),
            "position_ids": position_ids(seq_lens).tolist(), "seq_lens": seq_lens,
            "sources": [code[rows[i].get("source", "all")] for i in members]})
    if flat is None:
        flat = getattr(unwrap(model).config, "_attn_implementation", None) in VARLEN_BACKENDS
    # A varlen kernel reads a padded (B, L) batch as one long sequence: packed examples (and the
    # padding) would attend to each other. So the same layout as training for the same backend.
    collate = Collator(pad_id=0, flat=flat)
    batches = []
    for lo in range(0, len(packed_rows), micro_batch_size):
        group = packed_rows[lo:lo + micro_batch_size]
        batch = collate(group)
        # The source of each trained position, from the CPU-side layout: (N,) codes.
        owner = _position_sources(batch, [s for row in group for s in row["sources"]])
        batches.append(batch | {"target_sources": owner[batch["target_index"].numpy()]})
    scores = score(SFTModel(model), batches, num_sources=len(names))
    seen = [i for i in range(len(names)) if scores.tokens[i]]  # a source with no trained token has no numbers
    return scores.summary() | {"by_source": {names[i]: scores.summary(i) for i in seen}}


def _position_sources(batch: dict, codes: list[int]) -> np.ndarray:
    """Source code of every flat position of a collated batch (B x T), -1 on padding. `codes` has one
    entry per example, in the batch's order (row by row; the flat layout is one row)."""
    width = batch["input_ids"].shape[1]
    owner = np.full(batch["input_ids"].numel(), -1, dtype=np.int64)
    k = 0
    for r, lens in enumerate(batch["seq_lens"]):
        owner[r * width:r * width + sum(lens)] = np.repeat(codes[k:k + len(lens)], lens)
        k += len(lens)
    return owner


# -- generation ----------------------------------------------------------------------------------

def generate_replies(model, tokenizer, prompts: list[dict], cfg: SFTConfig, stop_ids: list[int],
                     batch_size: int = 8) -> list[dict]:
    """Greedy and sampled replies (sampling.TransformersEngine, as `sft generate` samples them: the same
    prompts with gen.n=1 gen.temperature=0 give these greedy replies); generation stops at any stop id."""
    from sft_cli.sampling import Prompt, SamplingParams, TransformersEngine, decode_reply

    engine = TransformersEngine(model, tokenizer.pad_token_id, stop_ids)
    opened = [bool(OPENER.search(p["prompt"])) for p in prompts]
    out = []
    for mode, temperature in (("greedy", 0.0), ("sampled", cfg.eval.temperature)):
        params = SamplingParams(n=1, temperature=temperature, top_p=cfg.eval.top_p,
                                max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed, batch_size=batch_size)
        # Each prompt's sampled reply has its own seeded stream: reproducible, whatever the batching.
        for i, (completion,) in engine.generate([Prompt(p["prompt_ids"], key=i) for i, p in enumerate(prompts)],
                                                params):
            p, reply = prompts[i], decode_reply(tokenizer, completion.token_ids, opened[i])
            row = {"mode": mode, "prompt": p["prompt"], "reference": p["reference"], "reply": reply.content,
                   "reply_ids": completion.token_ids, "stopped": completion.stopped,
                   "new_tokens": len(completion.token_ids)}
            if reply.reasoning is not None:
                row["reasoning"] = reply.reasoning
            out.append(row)
    return out


def reply_stats(replies: list[dict]) -> dict:
    sampled = [r["reply_ids"] for r in replies if r["mode"] == "sampled"]
    return {"replies": len(replies), "stopped_on_own": sum(r["stopped"] for r in replies) / max(len(replies), 1),
            "distinct_1": distinct_n(sampled, 1), "distinct_2": distinct_n(sampled, 2),
            "mean_reply_tokens": float(np.mean([len(r) for r in sampled])) if sampled else 0.0}


def compare(models: dict) -> dict:
    if "base" not in models:
        return {}
    base, tuned = models["base"], models["tuned"]
    return {"eval_loss_delta": tuned["loss"] - base["loss"],
            "forgetting_ppl_ratio": tuned["forgetting_ppl"] / max(base["forgetting_ppl"], 1e-9),
            "distinct_2_ratio": tuned["generation"]["distinct_2"] / max(base["generation"]["distinct_2"], 1e-9)}


def run_harness(cfg: SFTConfig, target: Path) -> dict:
    """Optional lm-evaluation-harness tasks; a clear note when it or its data is unavailable."""
    if not cfg.eval.harness_tasks:
        return {}
    try:
        import lm_eval
    except ImportError:
        ui.err.print("[yellow]eval.harness_tasks set but lm-evaluation-harness is not installed "
                     "(pip install lm-eval); skipped")
        return {"skipped": "lm-eval not installed"}
    try:
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={target}",
                                          tasks=list(cfg.eval.harness_tasks))
        return {task: values for task, values in results["results"].items()}
    except Exception as exc:  # offline datasets, unknown task names: report, don't fail the evaluation
        ui.err.print(f"[yellow]lm-eval could not run ({type(exc).__name__}: {str(exc)[:200]}); skipped")
        return {"skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}

