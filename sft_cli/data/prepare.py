"""`sft prepare`: raw data -> validated, chat-templated, tokenized, loss-masked examples.

Reads `data.sources`, writes `run_dir/prepared/` atomically:

    prepared/
      dataset_dict.json, train/, eval/   datasets.load_from_disk -> DatasetDict
                                         columns: input_ids, labels (-100 = no loss), source, location,
                                         num_tokens, num_loss_tokens
      tokenizer/                         the tokenizer + chat template every later stage uses
      rejected.jsonl                     every rejected row: location, reason, detail, raw (cut)
      report.json                        counts by reason, tokens, loss tokens, length percentiles
      manifest.json                      written last: fingerprint of sources + tokenizer + config

Run it again with nothing changed and it reuses the output.

    sft prepare recipe=demo show=2
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np

from sft_cli import console as ui
from sft_cli.artifacts import (
    atomic_dir,
    fingerprint,
    is_complete,
    read_manifest,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from sft_cli.config import SFTConfig, to_yaml
from sft_cli.data.mix import mix_counts, sample, split_indices
from sft_cli.data.render import Renderer
from sft_cli.data.sources import content_fingerprint, default_num_proc, load_source, source_name
from sft_cli.data.templates import load_tokenizer, special_token_ids
from sft_cli.errors import ConfigError, SFTError

PREPARE_VERSION = 1  # bump when the output of the same inputs changes
KEPT_COLUMNS = ["input_ids", "labels", "source", "location", "num_tokens", "num_loss_tokens"]
FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "source": datasets.Value("string"), "location": datasets.Value("string"),
    "hash": datasets.Value("int64"), "reason": datasets.Value("string"), "detail": datasets.Value("string"),
    "kind": datasets.Value("string"), "num_tokens": datasets.Value("int32"),
    "num_loss_tokens": datasets.Value("int32"), "last_loss_id": datasets.Value("int64"),
})


def validate(cfg: SFTConfig) -> None:
    data = cfg.data
    if not data.sources:
        raise ConfigError("data.sources", "is empty", "add at least one {path: ..., format: auto} entry")
    if not 0 <= data.eval_fraction < 1:
        raise ConfigError("data.eval_fraction", f"{data.eval_fraction} is outside [0, 1)", "use e.g. 0.05")
    if cfg.max_seq_len < 8:
        raise ConfigError("max_seq_len", f"{cfg.max_seq_len} is too small", "use e.g. 2048")
    train = [(i, s) for i, s in enumerate(data.sources) if s.split.value == "train"]
    weighted = [i for i, s in train if s.weight is not None]
    if weighted and len(weighted) != len(train):
        missing = next(i for i, s in train if s.weight is None)
        raise ConfigError(f"data.sources[{missing}].weight", "is unset while other sources have weights",
                          "give every training source a weight, or none (each example used once)")
    for i, s in train:
        if s.weight is not None and s.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight", f"{s.weight} must be > 0", "drop the source instead")
    names = [source_name(s, i) for i, s in enumerate(data.sources)]
    duplicates = [n for n, c in Counter(names).items() if c > 1]
    if duplicates:
        i = names.index(duplicates[0], names.index(duplicates[0]) + 1)
        raise ConfigError(f"data.sources[{i}].name", f"two sources are named '{duplicates[0]}'",
                          f"set data.sources[{i}].name to tell them apart")


def prepare_fingerprint(cfg: SFTConfig, tokenizer) -> str:
    data = cfg.data
    return fingerprint(
        PREPARE_VERSION,
        [content_fingerprint(s, i) for i, s in enumerate(data.sources)],
        [{k: str(v) for k, v in vars(s).items()} for s in data.sources],
        {"loss_on": data.loss_on.value, "overlong": data.overlong.value, "eval_fraction": data.eval_fraction,
         "dedupe": data.dedupe, "on_error": data.on_error.value},
        cfg.max_seq_len, cfg.seed,
        tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template, tokenizer.special_tokens_map,
    )


def run(cfg: SFTConfig) -> int:
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    out = run_dir / "prepared"
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.data.chat_template,
                               cfg.model.trust_remote_code, cfg.model.revision)
    fp = prepare_fingerprint(cfg, tokenizer)
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    if is_complete(out, fp):
        ui.err.print(f"[green]prepared/ is up to date[/] (fingerprint {fp}): reusing {out}")
        report = json.loads((out / "report.json").read_text())
    else:
        report = build(cfg, tokenizer, fp, out)
    ui.print_prepare_report(report, out)
    if cfg.show:
        ui.show_examples(datasets.load_from_disk(str(out))["train"], load_prepared_tokenizer(out), cfg.show)
    return 0


def load_prepared_tokenizer(prepared: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(prepared) / "tokenizer"))


def build(cfg: SFTConfig, tokenizer, fp: str, out: Path) -> dict:
    data = cfg.data
    names = [source_name(s, i) for i, s in enumerate(data.sources)]
    work = Path(cfg.run_dir) / ".work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        raw = datasets.concatenate_datasets(
            [load_source(src, i, work) for i, src in enumerate(data.sources)])
        renderer = Renderer(
            tokenizer, data.loss_on.value, cfg.max_seq_len, data.overlong.value,
            formats={n: s.format.value for n, s in zip(names, data.sources)},
            columns={n: dict(s.columns) for n, s in zip(names, data.sources)},
            special_ids=special_token_ids(tokenizer))
        processed = raw.map(renderer, batched=True, batch_size=512, remove_columns=raw.column_names,
                            features=FEATURES, num_proc=default_num_proc(len(raw), data.num_proc),
                            cache_file_name=str(work / "processed.arrow"), desc="templating + tokenizing")
        with atomic_dir(out) as tmp:
            report = _select_and_write(cfg, tokenizer, names, raw, processed, tmp)
            write_manifest(tmp, fp, {"stage": "prepare", "rows": report["kept"], "eot_token_ids": report["eot_token_ids"]})
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _select_and_write(cfg, tokenizer, names, raw, processed, tmp: Path) -> dict:
    data = cfg.data
    table = processed.select_columns(["reason", "hash", "source", "kind", "num_tokens", "num_loss_tokens",
                                      "last_loss_id", "location", "detail"]).data
    reason = np.asarray(table.column("reason").to_pylist(), dtype=object)
    source = np.asarray(table.column("source").to_pylist(), dtype=object)
    location = table.column("location").to_pylist()
    detail = table.column("detail").to_pylist()

    if data.on_error.value == "raise" and (reason != "").any():
        first = int(np.flatnonzero(reason != "")[0])
        raise SFTError(f"{location[first]}: {reason[first]}" + (f": {detail[first]}" if detail[first] else "")
                       + "  (data.on_error=raise; use skip to count and report bad rows instead)")
    if (reason == "no_chat_template").any():
        raise ConfigError("data.chat_template", "the tokenizer has no chat template and none is set",
                          "set data.chat_template=chatml (or llama3, zephyr, or a path to a .jinja file)")

    if data.dedupe:
        hashes = table.column("hash").to_numpy()
        ok = np.flatnonzero(reason == "")
        _, first_pos = np.unique(hashes[ok], return_index=True)
        duplicate = np.setdiff1d(ok, ok[first_pos])
        first_of = dict(zip(hashes[ok[first_pos]].tolist(), ok[first_pos].tolist()))
        for j in duplicate.tolist():
            reason[j], detail[j] = "duplicate", f"same example as {location[first_of[int(hashes[j])]]}"

    kept = reason == ""
    per_source = {}
    for name, src in zip(names, data.sources):
        mine = source == name
        per_source[name] = {"read": int(mine.sum()), "kept": int((mine & kept).sum()),
                            "rejected": int((mine & ~kept).sum()), "split": src.split.value, "weight": src.weight}
    empty = [n for n, s in per_source.items() if s["kept"] == 0]
    _write_rejected(tmp / "rejected.jsonl", raw, np.flatnonzero(~kept), reason, detail, location, source)
    if empty:
        reasons = Counter(reason[(source == empty[0]) & ~kept]).most_common(3)
        raise SFTError(f"source '{empty[0]}' has zero valid rows ({per_source[empty[0]]['read']} read; "
                       f"top reasons: {', '.join(f'{r} x{c}' for r, c in reasons) or 'no rows'})")

    _audit(cfg, tokenizer, table, kept)

    train_parts, eval_parts = {}, {}
    for salt, (name, src) in enumerate(zip(names, data.sources)):
        idx = np.flatnonzero((source == name) & kept)
        if src.split.value == "eval":
            train_parts[name], eval_parts[name] = idx[:0], idx
        else:
            train_parts[name], eval_parts[name] = split_indices(idx, data.eval_fraction, cfg.seed, salt)
    weights = {n: s.weight for n, s in zip(names, data.sources) if s.split.value == "train"}
    if all(w is not None for w in weights.values()) and weights:
        counts = mix_counts({n: len(train_parts[n]) for n in weights}, weights)
        train_parts = {n: sample(train_parts[n], counts[n], cfg.seed, i) if n in counts else train_parts[n]
                       for i, n in enumerate(names)}
    train_idx = np.concatenate(list(train_parts.values())) if train_parts else np.array([], dtype=np.int64)
    train_idx = train_idx[np.random.default_rng([cfg.seed, 3]).permutation(len(train_idx))]
    eval_idx = np.sort(np.concatenate(list(eval_parts.values())))

    final = processed.select_columns(KEPT_COLUMNS)
    splits = {"train": final.select(train_idx)}
    if len(eval_idx):
        splits["eval"] = final.select(eval_idx)
    datasets.DatasetDict(splits).save_to_disk(str(tmp))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))

    for name in names:
        per_source[name]["train"] = int(len(train_parts[name]))
        per_source[name]["eval"] = int(len(eval_parts[name]))
    return _report(cfg, table, kept, reason, per_source, train_idx, eval_idx, tmp)


def _audit(cfg, tokenizer, table, kept) -> None:
    """Fail the run, not warn, when the template's masks would train nothing useful."""
    kind = np.asarray(table.column("kind").to_pylist(), dtype=object)
    chat = kept & (kind == "chat")
    if not chat.any():
        return
    last = table.column("last_loss_id").to_numpy()[chat]
    closed = np.isin(last, sorted(special_token_ids(tokenizer)))
    if not closed.any():
        sample_id = int(last[0])
        raise SFTError(
            "audit: the end-of-turn token is never in the loss (every assistant turn ends on "
            f"{tokenizer.convert_ids_to_tokens(sample_id)!r}, not a special token), so the model would never learn "
            "to stop. Use a chat template that closes assistant turns with a special token "
            "(data.chat_template=chatml|llama3|zephyr).")


def _write_rejected(path: Path, raw, rows: np.ndarray, reason, detail, location, source) -> None:
    raw_text = raw.select(rows)["raw"] if len(rows) else []
    with open(path, "w") as handle:
        for j, text in zip(rows.tolist(), raw_text):
            handle.write(json.dumps({"location": location[j], "source": source[j], "reason": reason[j],
                                     "detail": detail[j], "raw": (text or "")[:2000]}, ensure_ascii=False) + "\n")


def _report(cfg, table, kept, reason, per_source, train_idx, eval_idx, tmp: Path) -> dict:
    tokens = table.column("num_tokens").to_numpy()
    loss_tokens = table.column("num_loss_tokens").to_numpy()
    lengths = tokens[kept]
    rejected = Counter(reason[~kept].tolist())
    last = table.column("last_loss_id").to_numpy()[kept]
    kind = np.asarray(table.column("kind").to_pylist(), dtype=object)[kept]
    report = {
        "run_dir": str(cfg.run_dir),
        "read": int(len(reason)),
        "kept": int(kept.sum()),
        "rejected": int((~kept).sum()),
        "rejected_by_reason": dict(rejected.most_common()),
        "first_rejected": [],
        "sources": per_source,
        "train_examples": int(len(train_idx)),
        "eval_examples": int(len(eval_idx)),
        "train_tokens": int(tokens[train_idx].sum()) if len(train_idx) else 0,
        "train_loss_tokens": int(loss_tokens[train_idx].sum()) if len(train_idx) else 0,
        "eval_tokens": int(tokens[eval_idx].sum()) if len(eval_idx) else 0,
        "eval_loss_tokens": int(loss_tokens[eval_idx].sum()) if len(eval_idx) else 0,
        "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {
            "max": int(lengths.max()), "min": int(lengths.min())},
        "length_histogram": _histogram(lengths, cfg.max_seq_len),
        "max_seq_len": cfg.max_seq_len,
        "loss_on": cfg.data.loss_on.value,
        "eot_token_ids": sorted({int(t) for t in last[kind == "chat"].tolist()}),
    }
    with open(tmp / "rejected.jsonl") as handle:
        for line, _ in zip(handle, range(5)):
            row = json.loads(line)
            report["first_rejected"].append({k: row[k] for k in ("location", "reason", "detail")})
    write_json_atomic(tmp / "report.json", report)
    return report


def _histogram(lengths: np.ndarray, max_seq_len: int, bins: int = 8) -> list[dict]:
    edges = np.linspace(0, max(int(lengths.max()), 1), bins + 1).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    return [{"from": int(a), "to": int(b), "count": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts)]


def prepared_manifest(run_dir: Path) -> dict | None:
    return read_manifest(Path(run_dir) / "prepared")
