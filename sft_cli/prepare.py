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
from sft_cli.config import LossOn, SFTConfig, to_yaml
from sft_cli.data.mix import mix_counts, sample, split_indices
from sft_cli.data.render import OUTPUT_FEATURES, STAT_COLUMNS, Renderer
from sft_cli.data.sources import content_fingerprint, default_num_proc, load_source, source_name
from sft_cli.data.templates import load_tokenizer, special_token_ids
from sft_cli.errors import ConfigError, SFTError
from sft_cli.run_dir import (
    atomic_dir,
    fingerprint,
    is_complete,
    read_manifest,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)

# Bump when the output of the same inputs changes (2: control tokens in text rejected, BOM;
# 3: tool calls, reasoning, per-turn examples, stop tokens learned from the template).
PREPARE_VERSION = 3
KEPT_COLUMNS = ["input_ids", "labels", "source", "location", "num_tokens", "num_loss_tokens"]


def _check_sources(cfg: SFTConfig) -> None:
    """What only prepare needs of the sources (config.validate() checked every value already):
    at least one, and distinct names, as data/sources.py names them (the file stem by default)."""
    data = cfg.data
    if not data.sources:
        raise ConfigError("data.sources", "is empty", "add at least one {path: ..., format: auto} entry")
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
         "dedupe": data.dedupe, "on_error": data.on_error.value, "reasoning_turns": data.reasoning_turns.value,
         "reasoning_format": data.reasoning_format.value,
         "chat_template_kwargs": json.dumps(dict(data.chat_template_kwargs), sort_keys=True, default=str)},
        cfg.max_seq_len, cfg.seed,
        tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template, tokenizer.special_tokens_map,
    )


def run(cfg: SFTConfig) -> int:
    _check_sources(cfg)
    run_dir = Path(cfg.run_dir)
    out = run_dir / "prepared"
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.data.chat_template,
                               cfg.model.trust_remote_code, cfg.model.revision)
    fp = prepare_fingerprint(cfg, tokenizer)
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    if is_complete(out, fp):  # reused (pack and train run prepare first): one line, not the tables again
        ui.print_prepared_reused(json.loads((out / "report.json").read_text()), out, fp)
    else:
        ui.print_prepare_report(build(cfg, tokenizer, fp, out), out)
    if cfg.show:
        ui.show_examples(datasets.load_from_disk(str(out))["train"], load_prepared_tokenizer(out), cfg.show)
    return 0


def load_prepared_tokenizer(prepared: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(prepared) / "tokenizer"))


def build(cfg: SFTConfig, tokenizer, fp: str, out: Path) -> dict:
    names = [source_name(s, i) for i, s in enumerate(cfg.data.sources)]
    work = Path(cfg.run_dir) / ".work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        raw, processed, stop_tokens = _tokenize(cfg, tokenizer, names, work)
        with atomic_dir(out) as tmp:
            report = _select_and_write(cfg, tokenizer, names, raw, processed, tmp, stop_tokens)
            write_manifest(tmp, fp, {"stage": "prepare", "rows": report["kept"], "eot_token_ids": report["eot_token_ids"]})
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tokenize(cfg: SFTConfig, tokenizer, names: list[str], work: Path):
    """Raw rows of every source -> one processed row each (tokens + labels, or a rejection)."""
    data = cfg.data
    raw = datasets.concatenate_datasets([load_source(src, i, work) for i, src in enumerate(data.sources)])
    renderer = Renderer(
        tokenizer, data.loss_on.value, cfg.max_seq_len, data.overlong.value,
        formats={n: s.format.value for n, s in zip(names, data.sources)},
        columns={n: dict(s.columns) for n, s in zip(names, data.sources)},
        special_ids=special_token_ids(tokenizer), reasoning_turns=data.reasoning_turns.value,
        reasoning_format=data.reasoning_format.value, template_kwargs=dict(data.chat_template_kwargs))
    num_proc = default_num_proc(len(raw), data.num_proc)
    with ui.datasets_progress():
        # One process maps in this one: a pool of one would only add a fork and a copy of every batch.
        processed = raw.map(renderer.table, batched=True, batch_size=512, remove_columns=raw.column_names,
                            with_indices=True, features=OUTPUT_FEATURES, num_proc=num_proc if num_proc > 1 else None,
                            cache_file_name=str(work / "processed.arrow"), desc="templating + tokenizing")
    return raw, processed, renderer.stop_tokens()


class _Columns:
    """The bookkeeping columns of the processed rows as numpy arrays (no per-row Python objects:
    1M rows cost ~30 MB here). Strings are fetched only for the rows a message needs."""

    def __init__(self, processed: datasets.Dataset, names: list[str]):
        import pyarrow.compute as pc

        table = processed.data
        self.table = table
        self.reason = table.column("reason")
        self.ok = pc.equal(self.reason, "").to_numpy(zero_copy_only=False)
        self.chat = pc.equal(table.column("kind"), "chat").to_numpy(zero_copy_only=False)
        codes = {name: i for i, name in enumerate(names)}
        source = pc.dictionary_encode(table.column("source")).combine_chunks()
        lookup = np.array([codes[n] for n in source.dictionary.to_pylist()], dtype=np.int64)
        self.source = lookup[source.indices.to_numpy(zero_copy_only=False)]
        self.hash = table.column("hash").to_numpy()
        self.tokens = table.column("num_tokens").to_numpy().astype(np.int64)
        self.loss_tokens = table.column("num_loss_tokens").to_numpy().astype(np.int64)
        self.last_loss_id = table.column("last_loss_id").to_numpy()
        # A raw row gives one processed row when rejected and one or more examples when kept;
        # `first` marks one per raw row, so rows are counted on it.
        self.row = table.column("row").to_numpy()
        self.first = table.column("part").to_numpy() == 0
        self.own = table.column("own").to_numpy().astype(bool)
        self.table_stats = {name: table.column(name).to_numpy().astype(np.int64) for name in STAT_COLUMNS}

    def stop_ids(self, rows: np.ndarray) -> set[int]:
        import pyarrow.compute as pc

        return set(pc.unique(pc.list_flatten(self.table.column("stop_ids").take(rows))).to_pylist())

    def strings(self, column: str, rows: np.ndarray) -> list[str]:
        return self.table.column(column).take(rows).to_pylist()


def _select_and_write(cfg, tokenizer, names, raw, processed, tmp: Path, stop_tokens: list[str]) -> dict:
    data = cfg.data
    cols = _Columns(processed, names)
    if data.on_error.value == "raise" and not cols.ok.all():
        first = np.flatnonzero(~cols.ok)[:1]
        (where,), (reason,), (detail,) = (cols.strings(c, first) for c in ("location", "reason", "detail"))
        raise SFTError(f"{where}: {reason}" + (f": {detail}" if detail else "")
                       + "  (data.on_error=raise; use skip to count and report bad rows instead)")
    if not cols.ok.all() and "no_chat_template" in cols.strings("reason", np.flatnonzero(~cols.ok)):
        raise ConfigError("data.chat_template", "the tokenizer has no chat template and none is set",
                          "set data.chat_template=chatml (or llama3, zephyr, or a path to a .jinja file)")

    # Exact duplicates: keep the first occurrence in source order.
    kept = cols.ok.copy()
    duplicate_of = np.full(len(kept), -1, dtype=np.int64)
    if data.dedupe:
        ok = np.flatnonzero(cols.ok)
        _, first_pos, inverse = np.unique(cols.hash[ok], return_index=True, return_inverse=True)
        original = ok[first_pos][inverse]
        is_dup = original != ok
        duplicate_of[ok[is_dup]] = original[is_dup]
        kept[ok[is_dup]] = False

    per_source = {}
    for code, (name, src) in enumerate(zip(names, data.sources)):
        mine = (cols.source == code) & cols.first  # rows, not examples
        per_source[name] = {"read": int(mine.sum()), "kept": int((mine & kept).sum()),
                            "rejected": int((mine & ~kept).sum()), "split": src.split.value, "weight": src.weight}
    rejected_by_reason, first_rejected = _write_rejected(tmp / "rejected.jsonl", raw, cols, kept, duplicate_of)
    empty = [n for n, s in per_source.items() if s["kept"] == 0]
    if empty:
        rows = np.flatnonzero((cols.source == names.index(empty[0])) & ~kept & cols.first)
        reasons = Counter("duplicate" if duplicate_of[j] >= 0 else r
                          for j, r in zip(rows.tolist(), cols.strings("reason", rows))).most_common(3)
        raise SFTError(f"source '{empty[0]}' has zero valid rows ({per_source[empty[0]]['read']} read; "
                       f"top reasons: {', '.join(f'{r} x{c}' for r, c in reasons) or 'no rows'})")
    if cfg.data.loss_on != LossOn.all:  # under `all` every token trains, end-of-turn markers included
        _audit(tokenizer, cols, kept)

    train_parts, eval_parts = {}, {}
    for code, (name, src) in enumerate(zip(names, data.sources)):
        idx = np.flatnonzero((cols.source == code) & kept)
        if src.split.value == "eval":
            train_parts[name], eval_parts[name] = idx[:0], idx
        else:
            # Split rows, not examples: the examples of one conversation stay on one side.
            firsts = idx[cols.first[idx]]
            train_rows, _ = split_indices(firsts, data.eval_fraction, cfg.seed, code)
            in_train = np.isin(cols.row[idx], cols.row[train_rows])
            train_parts[name], eval_parts[name] = idx[in_train], idx[~in_train]
    weights = {n: s.weight for n, s in zip(names, data.sources) if s.split.value == "train"}
    if weights and all(w is not None for w in weights.values()):
        counts = mix_counts({n: len(train_parts[n]) for n in weights}, weights)
        train_parts = {n: sample(train_parts[n], counts[n], cfg.seed, i) if n in counts else train_parts[n]
                       for i, n in enumerate(names)}
    train_idx = np.concatenate(list(train_parts.values()))
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

    lengths = cols.tokens[kept]
    kept_rows = kept & cols.first
    stop_ids = cols.stop_ids(np.flatnonzero(kept & cols.chat)) if (kept & cols.chat).any() else set()
    stop_ids |= {tokenizer.convert_tokens_to_ids(t) for t in stop_tokens} - {None, tokenizer.unk_token_id}
    report = {
        "run_dir": str(cfg.run_dir),
        "read": int(cols.first.sum()), "kept": int(kept_rows.sum()), "rejected": int((cols.first & ~kept).sum()),
        "examples": int(kept.sum()),
        "rejected_by_reason": rejected_by_reason, "first_rejected": first_rejected,
        "sources": per_source,
        "train_examples": int(len(train_idx)), "eval_examples": int(len(eval_idx)),
        "train_tokens": int(cols.tokens[train_idx].sum()),
        "train_loss_tokens": int(cols.loss_tokens[train_idx].sum()),
        "eval_tokens": int(cols.tokens[eval_idx].sum()),
        "eval_loss_tokens": int(cols.loss_tokens[eval_idx].sum()),
        "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
        | {"max": int(lengths.max()), "min": int(lengths.min())},
        "length_histogram": _histogram(lengths),
        "max_seq_len": cfg.max_seq_len,
        "loss_on": data.loss_on.value,
        # The tokens that end a generated turn: generation stops on these (see evaluate, final/).
        "eot_token_ids": sorted(int(t) for t in stop_ids),
        # Tool calls and reasoning: what was trained, and what the per-turn examples cost.
        "chat": {name: int(cols.table_stats[name][kept].sum()) for name in STAT_COLUMNS}
        | {"turn_example_tokens": int(cols.tokens[kept & cols.own].sum()),
           "reasoning_turns": data.reasoning_turns.value, "reasoning_format": data.reasoning_format.value},
    }
    write_json_atomic(tmp / "report.json", report)
    return report


def _audit(tokenizer, cols: _Columns, kept: np.ndarray) -> None:
    """Fail the run, not warn, when the template's masks would train nothing useful."""
    chat = kept & cols.chat
    if not chat.any():
        return
    last = cols.last_loss_id[chat]
    if not np.isin(last, sorted(special_token_ids(tokenizer))).any():
        raise SFTError(
            "audit: the end-of-turn token is never in the loss (every assistant turn ends on "
            f"{tokenizer.convert_ids_to_tokens(int(last[0]))!r}, not a special token), so the model would never "
            "learn to stop. Use a chat template that closes assistant turns with a special token "
            "(data.chat_template=chatml|llama3|zephyr).")


def _write_rejected(path: Path, raw, cols: _Columns, kept, duplicate_of, chunk: int = 10_000):
    """Every rejected row with its reason, location and raw text (cut), streamed in chunks."""
    counts: Counter = Counter()
    first: list[dict] = []
    rows_all = np.flatnonzero(~kept & cols.first)  # one line per rejected raw row
    with open(path, "w") as handle:
        for lo in range(0, len(rows_all), chunk):
            rows = rows_all[lo:lo + chunk]
            reasons, details = cols.strings("reason", rows), cols.strings("detail", rows)
            locations, sources = cols.strings("location", rows), cols.strings("source", rows)
            raw_text = raw.data.column("raw").take(cols.row[rows]).to_pylist()
            for k, j in enumerate(rows.tolist()):
                reason, detail = reasons[k], details[k]
                if duplicate_of[j] >= 0:
                    reason = "duplicate"
                    detail = f"same example as {cols.strings('location', duplicate_of[j:j + 1])[0]}"
                counts[reason] += 1
                record = {"location": locations[k], "source": sources[k], "reason": reason, "detail": detail}
                if len(first) < 5:
                    first.append(dict(record))
                handle.write(json.dumps({**record, "raw": (raw_text[k] or "")[:2000]}, ensure_ascii=False) + "\n")
    return dict(counts.most_common()), first


def _histogram(lengths: np.ndarray, bins: int = 8) -> list[dict]:
    edges = np.linspace(0, max(int(lengths.max()), 1), bins + 1).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    return [{"from": int(a), "to": int(b), "count": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts)]


def prepared_manifest(run_dir: Path) -> dict | None:
    return read_manifest(Path(run_dir) / "prepared")
