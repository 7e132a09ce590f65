"""`sft pack`: prepared examples -> packed rows of at most `max_seq_len` tokens.

Reads `run_dir/prepared` (running prepare first when it is missing or stale) and
writes `run_dir/packed/` atomically: a DatasetDict (train, and eval when present)
whose rows carry

    input_ids, labels      the examples' tokens back to back (labels -100 at every example start)
    position_ids           restarting at 0 for every example (see packing.py for the picture)
    seq_lens               the examples' lengths, in order; they sum to the row's length
    example_ids            which prepared examples the row holds (rows of `wrapped` may hold pieces)

plus `report.json` (efficiency and counts) and `manifest.json` (written last).

    sft pack recipe=demo pack.strategy=bfd
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from sft_cli import console as ui
from sft_cli.config import SFTConfig
from sft_cli.data.packing import IGNORE_INDEX, bfd_bins, position_ids, wrapped_rows
from sft_cli.run_dir import (
    atomic_dir,
    fingerprint,
    is_complete,
    read_manifest,
    write_json_atomic,
    write_manifest,
)

PACK_VERSION = 1
ROWS_PER_CHUNK = 4096  # rows assembled at once: bounds memory at ~4096 * max_seq_len tokens
DATA_FILE = "data-00000-of-00001.arrow"  # each packed split is one Arrow stream file, named as datasets names it
FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
    "position_ids": datasets.Sequence(datasets.Value("int32")), "seq_lens": datasets.Sequence(datasets.Value("int32")),
    "example_ids": datasets.Sequence(datasets.Value("int64")),
})


def ensure_prepared(cfg: SFTConfig) -> Path:
    """prepared/ for this config, building or refreshing it (prepare reuses its cache)."""
    from sft_cli import prepare

    prepare.run(cfg)
    return Path(cfg.run_dir) / "prepared"


def run(cfg: SFTConfig) -> int:
    ensure_packed(cfg)
    return 0


def ensure_packed(cfg: SFTConfig) -> Path:
    prepared = ensure_prepared(cfg)
    out = Path(cfg.run_dir) / "packed"
    fp = fingerprint(PACK_VERSION, read_manifest(prepared)["fingerprint"], cfg.pack.strategy, cfg.max_seq_len,
                     cfg.seed)
    if is_complete(out, fp):
        ui.err.print(f"[green]packed/ is up to date[/] (fingerprint {fp}): reusing {out}")
        report = json.loads((out / "report.json").read_text())
    else:
        splits = datasets.load_from_disk(str(prepared))
        with atomic_dir(out) as tmp:
            report = {"strategy": cfg.pack.strategy, "max_seq_len": cfg.max_seq_len, "splits": {}}
            for name, split in splits.items():
                # The Arrow column as one numpy array: indexing split["num_tokens"] reads row by row.
                lengths = split.data.column("num_tokens").to_numpy()
                rows = plan_rows(lengths, cfg.pack.strategy, cfg.max_seq_len, cfg.seed)
                _, report["splits"][name] = _write_split(split, rows, cfg.max_seq_len, tmp / name / DATA_FILE)
                _describe_split(tmp / name, fingerprint(fp, name))
            write_json_atomic(tmp / "dataset_dict.json", {"splits": list(splits)})  # as DatasetDict writes it
            write_json_atomic(tmp / "report.json", report)
            write_manifest(tmp, fp, {"stage": "pack", "strategy": cfg.pack.strategy})
    ui.print_pack_report(report, out)
    return out


def plan_rows(lengths, strategy: str, max_seq_len: int, seed: int) -> list[list[tuple[int, int, int]]]:
    """Rows as lists of (example, start, stop) pieces; whole examples except under `wrapped`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if strategy == "wrapped":
        return wrapped_rows(lengths, max_seq_len)
    if strategy == "none":
        return [[(i, 0, int(n))] for i, n in enumerate(lengths.tolist())]
    bins = bfd_bins(lengths, max_seq_len)
    # BFD emits rows longest-first; shuffle whole rows (never their contents) so batches mix lengths.
    order = np.random.default_rng([seed, 4]).permutation(len(bins))
    return [[(i, 0, int(lengths[i])) for i in bins[b]] for b in order.tolist()]


class _TokenColumn:
    """A list<int32> column of a memory-mapped table, read chunk by chunk where it lies.

    combine_chunks() would copy the whole column into memory (2+ GB for input_ids + labels at
    1M examples); instead each Arrow chunk's offsets and values stay zero-copy numpy views of
    the mapped file, and gather() reads from each chunk only the pieces a block of rows needs.
    """

    def __init__(self, dataset: datasets.Dataset, column: str):
        chunks = dataset.data.column(column).chunks
        # `offsets` already accounts for a sliced chunk's start; they index into the unsliced `values`.
        self.offsets = [chunk.offsets.to_numpy() for chunk in chunks]
        self.values = [chunk.values.to_numpy() for chunk in chunks]
        self.first = np.cumsum([0] + [len(chunk) for chunk in chunks])  # first example of each chunk

    def gather(self, example: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
        """Tokens start:stop of each example, concatenated in the order given."""
        seq_lens = stop - start
        out = np.empty(int(seq_lens.sum()), dtype=np.int32)
        dest = np.cumsum(seq_lens) - seq_lens  # where each piece lands in `out`
        chunk = np.searchsorted(self.first, example, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        bounds = np.searchsorted(chunk[order], np.arange(len(self.first)))  # pieces of chunk c: bounds[c]:bounds[c+1]
        for c in np.flatnonzero(np.diff(bounds)).tolist():
            mine = order[bounds[c]:bounds[c + 1]]
            source = self.offsets[c][example[mine] - self.first[c]] + start[mine]
            out[_ranges(dest[mine], seq_lens[mine])] = self.values[c][_ranges(source, seq_lens[mine])]
        return out


def _ranges(begin: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """begin[0]..begin[0]+lengths[0]-1, begin[1].., concatenated: one vectorised index array."""
    return np.repeat(begin - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))


def _write_split(split: datasets.Dataset, rows, max_seq_len: int, path: Path) -> tuple[datasets.Dataset, dict]:
    """The packed rows of one split, written block by block straight to the Arrow file `path` (pages
    written are page cache, not this process's memory): that file as a Dataset, and its report."""
    ids, labels = _TokenColumn(split, "input_ids"), _TokenColumn(split, "labels")
    schema = FEATURES.arrow_schema
    real_tokens = loss_tokens = split_examples = max_per_row = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lo in range(0, len(rows), ROWS_PER_CHUNK):
            chunk = rows[lo:lo + ROWS_PER_CHUNK]
            pieces = np.array([p for row in chunk for p in row], dtype=np.int64).reshape(-1, 3)
            example, start, stop = pieces[:, 0], pieces[:, 1], pieces[:, 2]
            seq_lens = stop - start
            row_ids, row_labels = ids.gather(example, start, stop), labels.gather(example, start, stop)
            # Piece starts never carry a label (see packing.mask_example_starts): done in bulk here.
            row_labels[np.cumsum(seq_lens) - seq_lens] = IGNORE_INDEX
            pieces_per_row = np.array([len(row) for row in chunk], dtype=np.int64)
            row_token_offsets = np.concatenate([[0], np.cumsum(np.add.reduceat(seq_lens, np.r_[0, np.cumsum(
                pieces_per_row)[:-1]]))])
            piece_offsets = np.concatenate([[0], np.cumsum(pieces_per_row)])

            def lists(values, offs, kind):
                return pa.ListArray.from_arrays(pa.array(offs, pa.int32()), pa.array(values, kind))

            writer.write_table(pa.table({
                "input_ids": lists(row_ids, row_token_offsets, pa.int32()),
                "labels": lists(row_labels, row_token_offsets, pa.int32()),
                "position_ids": lists(position_ids(seq_lens), row_token_offsets, pa.int32()),
                "seq_lens": lists(seq_lens, piece_offsets, pa.int32()),
                "example_ids": lists(example, piece_offsets, pa.int64()),
            }, schema=schema))
            real_tokens += int(seq_lens.sum())
            loss_tokens += int((row_labels != IGNORE_INDEX).sum())
            split_examples += int((start > 0).sum())
            max_per_row = max(max_per_row, int(pieces_per_row.max(initial=0)))
    dataset = datasets.Dataset.from_file(str(path))  # mapped, not read
    n_rows = len(rows)
    report = {
        "rows": n_rows,
        "examples": len(split),
        "real_tokens": real_tokens,
        "loss_tokens": loss_tokens,
        "efficiency": real_tokens / max(n_rows * max_seq_len, 1),
        "examples_per_row_mean": sum(len(r) for r in rows) / max(n_rows, 1),
        "examples_per_row_max": max_per_row,
        "examples_split": split_examples,
        "examples_dropped": 0,  # prepare already dropped or cut everything longer than max_seq_len
    }
    return dataset, report


def _describe_split(folder: Path, split_fingerprint: str) -> None:
    """The two files besides the data that make `folder` a Dataset for datasets.load_from_disk, as
    Dataset.save_to_disk writes them (save_to_disk itself would copy every row once more, reading
    them through a mapping that holds the whole split in RSS until it is done)."""
    datasets.DatasetInfo(features=FEATURES).write_to_directory(str(folder))
    write_json_atomic(folder / "state.json", {
        "_data_files": [{"filename": DATA_FILE}], "_fingerprint": split_fingerprint, "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None})
