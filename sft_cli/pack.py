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

import contextlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sft_cli import console as ui
from sft_cli.config import SFTConfig
from sft_cli.data.packing import IGNORE_INDEX, Plan, bfd_bins, mask_example_starts, position_ids, wrapped_rows
from sft_cli.run_dir import (
    atomic_dir,
    fingerprint,
    is_complete,
    read_manifest,
    write_json_atomic,
    write_manifest,
)

PACK_VERSION = 1
# Rows are assembled (and written as one record batch) TOKENS_PER_BLOCK tokens at most at a time: 16 MB
# per int32 column, which bounds memory whatever max_seq_len is, and stays under glibc's 32 MB mmap
# threshold, so each block reuses the heap the last one freed instead of page-faulting in fresh memory.
TOKENS_PER_BLOCK = 1 << 22
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
        ui.print_packed_reused(json.loads((out / "report.json").read_text()), out, fp)
        return out
    splits = datasets.load_from_disk(str(prepared))
    with atomic_dir(out) as tmp:
        report = {"strategy": cfg.pack.strategy, "max_seq_len": cfg.max_seq_len, "splits": {}}
        for name, split in splits.items():
            report["splits"][name] = pack_split(split, cfg.pack.strategy, cfg.max_seq_len, cfg.seed, tmp / name,
                                                fingerprint(fp, name))
        write_json_atomic(tmp / "dataset_dict.json", {"splits": list(splits)})  # as DatasetDict writes it
        write_json_atomic(tmp / "report.json", report)
        write_manifest(tmp, fp, {"stage": "pack", "strategy": cfg.pack.strategy})
    ui.print_pack_report(report, out)
    return out


def pack_split(split: datasets.Dataset, strategy: str, max_seq_len: int, seed: int, folder: Path,
               split_fingerprint: str) -> dict:
    """One split packed into `folder`, a Dataset that datasets.load_from_disk reads: its report."""
    if split._indices is not None:  # a select()/shuffle() view: prepared/ never is one (save_to_disk writes rows)
        split = split.flatten_indices()
    paths = [file["filename"] for file in split.cache_files]
    ids, labels = (_locate(paths, split, column) for column in ("input_ids", "labels"))
    if not np.array_equal(ids.length, labels.length):
        raise ValueError("every example needs as many labels as input_ids")
    plan = plan_rows(ids.length, strategy, max_seq_len, seed)
    with contextlib.ExitStack() as files:
        fds = [files.enter_context(open(path, "rb", buffering=0)).fileno() for path in paths]
        report = _write_split(fds, ids, labels, plan, max_seq_len, folder / DATA_FILE)
    _describe_split(folder, split_fingerprint)
    return report


def plan_rows(lengths, strategy: str, max_seq_len: int, seed: int) -> Plan:
    """The packed rows of examples of these lengths; whole examples except under `wrapped`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if strategy == "wrapped":
        return wrapped_rows(lengths, max_seq_len)
    if strategy == "none":
        return Plan(np.arange(len(lengths)), np.zeros_like(lengths), lengths, np.arange(len(lengths) + 1))
    bins = bfd_bins(lengths, max_seq_len)
    # BFD emits rows longest-first; shuffle whole rows (never their contents) so batches mix lengths.
    order = np.random.default_rng([seed, 4]).permutation(len(bins))
    rows = [bins[b] for b in order.tolist()]
    example = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=len(lengths))
    row_offsets = np.cumsum([0, *map(len, rows)], dtype=np.int64)
    return Plan(example, np.zeros_like(example), lengths[example], row_offsets)


@dataclass(frozen=True)
class _Located:
    """Where each example's tokens of one list<int32> column lie in the split's Arrow files."""

    file: np.ndarray  # index of the file that holds it
    byte: np.ndarray  # file position of its first token
    length: np.ndarray  # tokens


def _locate(paths: list[str], split: datasets.Dataset, column: str) -> _Located:
    """Each example's tokens of `column` as positions in the Arrow stream files `paths`: each file is
    mapped once to read its layout (zero-copy, so buffer address - the file's address = file position),
    never its tokens. Checked against the split, so a Dataset that is not exactly its files fails."""
    files, firsts, lengths = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for index, path in enumerate(paths):
        whole = pa.memory_map(path).read_buffer()
        for chunk in pa.ipc.open_stream(whole).read_all().column(column).chunks:
            if chunk.type != pa.list_(pa.int32()):
                raise ValueError(f"{column} must be list<int32>, not {chunk.type}")
            # `offsets` already accounts for a sliced chunk's start; they index into the unsliced `values`.
            offsets, values = chunk.offsets.to_numpy().astype(np.int64), chunk.values
            start = values.buffers()[1].address - whole.address + 4 * values.offset
            files.append(np.full(len(chunk), index))
            firsts.append(start + 4 * offsets[:-1])
            lengths.append(np.diff(offsets))
    located = _Located(*map(np.concatenate, (files, firsts, lengths)))
    if not np.array_equal(located.length, pc.list_value_length(split.data.column(column)).to_numpy()):
        raise ValueError(f"the split's {column} is not what its files {paths} hold: pack reads splits that "
                         "datasets.load_from_disk returns")
    return located


def _read_pieces(fds: list[int], located: _Located, example: np.ndarray, start: np.ndarray,
                 stop: np.ndarray) -> np.ndarray:
    """Tokens start:stop of each example, back to back, read with pread straight into the result.
    Reading them through a memory map instead would keep most of the split's files in this process's
    RSS at scale: the kernel maps whole page-cache folios (64 KB and more) around every token touched."""
    lengths = 4 * (stop - start)
    out = np.empty(int(lengths.sum()) // 4, dtype=np.int32)
    into = memoryview(out).cast("B")
    dest = np.cumsum(lengths) - lengths
    for fd, at, size, source in zip(np.take(fds, located.file[example]).tolist(), dest.tolist(), lengths.tolist(),
                                    (located.byte[example] + 4 * start).tolist()):
        if os.preadv(fd, [into[at:at + size]], source) != size:
            raise OSError(f"short read at byte {source}: the split's files changed under pack")
    return out


def _write_split(fds: list[int], ids: _Located, labels: _Located, plan: Plan, max_seq_len: int, path: Path) -> dict:
    """The plan's rows written block by block to the Arrow stream file `path` (pages written are page
    cache, not this process's memory): the split's report."""
    loss_tokens = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, FEATURES.arrow_schema) as writer:
        rows_per_block = max(1, TOKENS_PER_BLOCK // max_seq_len)
        for lo in range(0, len(plan), rows_per_block):
            row_offsets = plan.row_offsets[lo:lo + rows_per_block + 1]
            pieces = slice(int(row_offsets[0]), int(row_offsets[-1]))
            block = _packed_block(fds, ids, labels, plan.example[pieces], plan.start[pieces], plan.stop[pieces],
                                  row_offsets - row_offsets[0])
            writer.write_table(block)
            loss_tokens += int(np.count_nonzero(block["labels"].chunk(0).values.to_numpy() != IGNORE_INDEX))
    n_rows, real_tokens = len(plan), int((plan.stop - plan.start).sum())
    return {
        "rows": n_rows,
        "examples": len(ids.length),
        "real_tokens": real_tokens,
        "loss_tokens": loss_tokens,
        "efficiency": real_tokens / max(n_rows * max_seq_len, 1),
        "examples_per_row_mean": len(plan.example) / max(n_rows, 1),
        "examples_per_row_max": int(np.diff(plan.row_offsets).max(initial=0)),
        "examples_split": int((plan.start > 0).sum()),
        "examples_dropped": 0,  # prepare already dropped or cut everything longer than max_seq_len
    }


def _packed_block(fds: list[int], ids: _Located, labels: _Located, example: np.ndarray, start: np.ndarray,
                  stop: np.ndarray, row_offsets: np.ndarray) -> pa.Table:
    """The packed rows whose pieces these are (row r: pieces row_offsets[r]:row_offsets[r + 1]) as one
    Arrow table of FEATURES: built column by column from flat numpy arrays and offsets."""
    seq_lens = (stop - start).astype(np.int32)
    token_offsets = np.concatenate([[0], np.cumsum(seq_lens, dtype=np.int32)])[row_offsets].astype(np.int32)

    def lists(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    return pa.table({
        "input_ids": lists(_read_pieces(fds, ids, example, start, stop), token_offsets),
        "labels": lists(mask_example_starts(_read_pieces(fds, labels, example, start, stop), seq_lens), token_offsets),
        "position_ids": lists(position_ids(seq_lens, np.int32), token_offsets),
        "seq_lens": lists(seq_lens, row_offsets.astype(np.int32)),
        "example_ids": lists(example, row_offsets.astype(np.int32)),
    }, schema=FEATURES.arrow_schema)


def _describe_split(folder: Path, split_fingerprint: str) -> None:
    """The two files besides the data that make `folder` a Dataset for datasets.load_from_disk, as
    Dataset.save_to_disk writes them (save_to_disk itself would copy every row once more, reading
    them through a mapping that holds the whole split in RSS until it is done)."""
    datasets.DatasetInfo(features=FEATURES).write_to_directory(str(folder))
    write_json_atomic(folder / "state.json", {
        "_data_files": [{"filename": DATA_FILE}], "_fingerprint": split_fingerprint, "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None})
