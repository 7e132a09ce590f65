"""Benchmark: `sft pack`'s best-fit-decreasing packing against TRL's `pack_dataset(strategy="bfd")`.

Same example lengths on both sides, drawn seeded from a LIMA-like distribution: a prompt of ~30
tokens (lognormal, 1..400) plus a response of ~250 tokens (lognormal median 250, sigma 0.8, capped
at 2,000); the sum clipped to [2, 2048]. max_seq_len 2048. For every size (10k, 100k and 1M
examples by default) each configuration runs in a fresh subprocess, which reports the seconds of
the timed call alone, the packing it produced and its own peak RSS (getrusage):

    ours bfd_bins         sft_cli.data.packing.bfd_bins(lengths, 2048): the pure algorithm
    ours plan_rows bfd    sft_cli.pack.plan_rows(lengths, "bfd", 2048, seed): bins + row shuffle
    ours sft pack         sft_cli.pack.pack_split: everything `sft pack` runs per split, on a
                          prepared-like split (`input_ids`, `labels`, `num_tokens`): the lengths
                          read, plan_rows, packed input_ids, labels, position_ids, seq_lens,
                          example_ids written as a Dataset folder that load_from_disk reads
    ours plan_rows wrap   the `wrapped` strategy, for reference (cuts examples across rows)
    trl bfd               trl.data_utils.pack_dataset(dataset, 2048, "bfd") on the same split's
                          `input_ids` + `labels` (what SFTTrainer packs), as SFTTrainer calls it:
                          `datasets.map` batches of 1,000 examples, each packed on its own
    trl bfd, one batch    the same with map_kwargs={"batch_size": None}: one BFD over everything
                          (up to 100k examples by default: at 1M it needs ~9 GB)

The split both sides read is written beforehand (untimed) as a memory-mapped Arrow file with
random token ids, 1,000 rows per record batch like `datasets` writes, so both read the same
bytes from the page cache and both write their packed output to disk. Every run's packing is
checked: each example exactly once, whole (nothing split or truncated; `wrapped` reports how many
it split), no row over 2048 tokens, and for `sft pack` and TRL the packed tokens are compared with
the source. Results go to the "## pack" section of BENCHMARKS.md and a table on the terminal.

    python -m bench.pack                          # 10k, 100k, 1M (make bench-pack), ~5 min
    python -m bench.pack --sizes 10000 100000     # smaller
    python -m bench.pack --repeat 3               # every run three times, the fastest kept
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (
    last_json,
    machine,
    markdown,
    print_table,
    run_measured,
    subprocess_env,
    write_section,
)

PROG = "python -m bench.pack"
MAX_SEQ_LEN = 2048
SEED = 0
VOCAB = 49_152
BATCH_ROWS = 1_000  # rows per record batch of the prepared-like file (datasets' writer_batch_size)
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
# TRL's single-batch variant holds the whole split (and a copy from `take`) in memory at once:
# ~9 GB at 1M examples of ~380 tokens with two columns. Capped by default.
DEFAULT_TRL_ONE_BATCH_MAX = 100_000

# name -> (label in the table, needs the token file)
TASKS = {
    "bins": ("ours bfd_bins", False),
    "plan": ("ours plan_rows bfd", False),
    "pack": ("ours sft pack", True),
    "wrapped": ("ours plan_rows wrapped", False),
    "trl": ("trl bfd", True),
    "trl-one-batch": ("trl bfd, one batch", True),
}


# -- data -----------------------------------------------------------------------------------------
def lengths_of(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(total lengths, prompt lengths) of n LIMA-like examples; totals in [2, MAX_SEQ_LEN]."""
    rng = np.random.default_rng([seed, n])
    prompt = np.clip(rng.lognormal(np.log(30), 0.7, n), 1, 400).astype(np.int64)
    response = np.clip(rng.lognormal(np.log(250), 0.8, n), 1, 2000).astype(np.int64)
    total = np.clip(prompt + response, 2, MAX_SEQ_LEN)
    return total, np.minimum(prompt, total - 1)


def write_split(path: Path, n: int, seed: int = SEED) -> None:
    """A prepared-like split: input_ids (random ids), labels (-100 over the prompt), num_tokens."""
    import pyarrow as pa

    lengths, prompt = lengths_of(n, seed)
    rng = np.random.default_rng([seed, n, 1])
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("num_tokens", pa.int32())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lo in range(0, n, BATCH_ROWS):
            length, head = lengths[lo:lo + BATCH_ROWS], prompt[lo:lo + BATCH_ROWS]
            offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)
            ids = rng.integers(0, VOCAB, int(offsets[-1]), dtype=np.int32)
            labels = ids.copy()
            in_prompt = np.arange(offsets[-1]) - np.repeat(offsets[:-1], length) < np.repeat(head, length)
            labels[in_prompt] = -100
            writer.write_table(pa.table({
                "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
                "num_tokens": pa.array(length.astype(np.int32)),
            }, schema=schema))


# -- checks ---------------------------------------------------------------------------------------
def packing(n: int, lengths: np.ndarray, row_off: np.ndarray, piece_len: np.ndarray,
            piece_example: np.ndarray | None = None, whole: bool = True) -> dict:
    """Rows, efficiency and examples per row of a packing given as pieces (a length each, and the
    example each comes from when known) grouped into rows by `row_off`. Raises when a row is
    empty or over MAX_SEQ_LEN, when tokens are lost, when an example is missing or packed twice,
    or, when `whole`, when an example was split or truncated. Without `piece_example` (TRL keeps
    no example ids) "whole" means one piece per example and the same multiset of lengths."""
    per_row = np.diff(row_off)
    if len(per_row) and per_row.min() < 1:
        raise AssertionError("an empty row")
    row_tokens = np.add.reduceat(piece_len, row_off[:-1]) if len(per_row) else piece_len[:0]
    if row_tokens.max(initial=0) > MAX_SEQ_LEN:
        raise AssertionError(f"a row holds {row_tokens.max()} tokens > {MAX_SEQ_LEN}")
    if int(piece_len.sum()) != int(lengths.sum()):
        raise AssertionError(f"{int(piece_len.sum()):,} tokens packed, {int(lengths.sum()):,} given")
    if piece_example is None:
        if len(piece_len) != n or not np.array_equal(np.sort(piece_len), np.sort(lengths)):
            raise AssertionError(f"{len(piece_len):,} pieces from {n:,} examples: some were split or truncated")
        split = 0
    elif whole:
        if not np.array_equal(np.sort(piece_example), np.arange(n)):
            raise AssertionError("an example is missing or packed twice")
        if not np.array_equal(piece_len, lengths[piece_example]):
            raise AssertionError("an example was split or truncated")
        split = 0
    else:  # wrapped: every example present, some of them in several pieces
        if not np.array_equal(np.unique(piece_example), np.arange(n)):
            raise AssertionError("an example is missing")
        split = n - int((piece_len == lengths[piece_example]).sum())
    tokens = int(piece_len.sum())
    return {"rows": len(per_row), "tokens": tokens, "efficiency": tokens / max(len(per_row) * MAX_SEQ_LEN, 1),
            "per_row_mean": float(per_row.mean()) if len(per_row) else 0.0,
            "per_row_max": int(per_row.max(initial=0)), "split": split}


def _list_column(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, flat values) of a list column."""
    array = table.column(name).combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], array.values.to_numpy()[offsets[0]:offsets[-1]]


def check_ours_tokens(source, packed, rows: int = 300) -> None:
    """`rows` random packed rows, token for token: the examples' input_ids back to back, their labels
    with -100 at every example start, positions restarting at 0."""
    from sft_cli.data.packing import position_ids

    src_off, src_ids = _list_column(source.data, "input_ids")
    _, src_labels = _list_column(source.data, "labels")
    out_off, out_ids = _list_column(packed.data, "input_ids")
    _, out_labels = _list_column(packed.data, "labels")
    _, out_pos = _list_column(packed.data, "position_ids")
    ex_off, examples = _list_column(packed.data, "example_ids")
    for r in np.random.default_rng(1).choice(len(packed), min(rows, len(packed)), replace=False).tolist():
        members = examples[ex_off[r]:ex_off[r + 1]]
        lens = src_off[members + 1] - src_off[members]
        ids = np.concatenate([src_ids[src_off[e]:src_off[e + 1]] for e in members])
        labels = np.concatenate([src_labels[src_off[e]:src_off[e + 1]] for e in members])
        labels[np.cumsum(lens) - lens] = -100
        row = slice(out_off[r], out_off[r + 1])
        if not (np.array_equal(out_ids[row], ids) and np.array_equal(out_labels[row], labels)
                and np.array_equal(out_pos[row], position_ids(lens))):
            raise AssertionError(f"packed row {r} does not hold its examples' tokens")


def check_trl_tokens(source, packed) -> None:
    """TRL keeps no example ids: every source example's (length, sum of ids, sum of labels) must be
    some packed piece's, one to one, so every piece is one whole example, unchanged."""
    src_off, src_ids = _list_column(source.data, "input_ids")
    _, src_labels = _list_column(source.data, "labels")
    out_off, out_ids = _list_column(packed.data, "input_ids")
    _, out_labels = _list_column(packed.data, "labels")
    seq_off, seq = _list_column(packed.data, "seq_lengths")
    seq = seq.astype(np.int64)
    within = np.cumsum(seq) - seq  # start of each piece in the flat token column
    within -= np.repeat(within[seq_off[:-1]], np.diff(seq_off))  # ... then relative to its row
    starts = np.repeat(out_off[:-1], np.diff(seq_off)) + within

    def keys(begin, lens, ids, labels):
        ids_sum = np.add.reduceat(ids.astype(np.int64), begin)
        labels_sum = np.add.reduceat(labels.astype(np.int64), begin)
        order = np.lexsort((labels_sum, ids_sum, lens))
        return np.stack([lens[order], ids_sum[order], labels_sum[order]])

    if not np.array_equal(keys(src_off[:-1], np.diff(src_off), src_ids, src_labels),
                          keys(starts, seq, out_ids, out_labels)):
        raise AssertionError("TRL's packed examples differ from the source examples")


# -- one configuration, in a subprocess -----------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed_steps(module, names: tuple[str, ...]) -> dict[str, float]:
    """Seconds spent in each of `module`'s functions `names`, filled in as the module calls them: the
    steps of one call timed without copying it."""
    seconds = dict.fromkeys(names, 0.0)

    def timed(name, function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
        return call

    for name in names:
        setattr(module, name, timed(name, getattr(module, name)))
    return seconds


def worker(spec: dict) -> dict:
    task, n, seed = spec["task"], spec["n"], spec["seed"]
    lengths, _ = lengths_of(n, seed)
    if task in ("bins", "plan", "wrapped"):
        from sft_cli.data.packing import bfd_bins
        from sft_cli.pack import plan_rows

        start = time.perf_counter()
        if task == "bins":
            bins = bfd_bins(lengths, MAX_SEQ_LEN)
        else:
            plan = plan_rows(lengths, "wrapped" if task == "wrapped" else "bfd", MAX_SEQ_LEN, seed)
        seconds = time.perf_counter() - start
        if task == "bins":
            row_off = np.concatenate([[0], np.cumsum([len(b) for b in bins])])
            example = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=int(row_off[-1]))
            piece_len = lengths[example]
        else:
            row_off, example, piece_len = plan.row_offsets, plan.example, plan.stop - plan.start
            if task == "plan" and (plan.start != 0).any():
                raise AssertionError("plan_rows(bfd) produced a piece that does not start at 0")
        result = packing(n, lengths, row_off, piece_len, example, whole=task != "wrapped")
        return {**result, "seconds": seconds, "rss_mb": _peak_rss_mb()}

    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()  # no map result is reused from an earlier run
    source = datasets.Dataset.from_file(spec["data"])
    if not np.array_equal(np.asarray(source.data.column("num_tokens")), lengths):
        raise AssertionError("the token file does not hold this size's lengths")
    out = Path(spec["out"])
    if task == "pack":
        from sft_cli import pack

        # What ensure_packed runs per split, in one call; its steps timed inside that call.
        steps = _timed_steps(pack, ("_locate", "plan_rows", "_write_split"))
        start = time.perf_counter()
        report = pack.pack_split(source, "bfd", MAX_SEQ_LEN, seed, out / "train", "bench")
        seconds = time.perf_counter() - start
        rss = _peak_rss_mb()
        packed = datasets.load_from_disk(str(out / "train"))
        row_off, example = _list_column(packed.data, "example_ids")
        _, piece_len = _list_column(packed.data, "seq_lens")
        result = packing(n, lengths, row_off, piece_len.astype(np.int64), example)
        if report["rows"] != result["rows"] or report["examples_split"] or report["real_tokens"] != result["tokens"]:
            raise AssertionError(f"pack_split's report disagrees with its rows: {report}")
        check_ours_tokens(source, packed)
        return {**result, "seconds": seconds, "read_seconds": steps["_locate"], "plan_seconds": steps["plan_rows"],
                "write_seconds": steps["_write_split"], "rss_mb": rss}

    from trl.data_utils import pack_dataset

    dataset = source.select_columns(["input_ids", "labels"])  # what SFTTrainer hands pack_dataset
    map_kwargs = {"batch_size": None} if task == "trl-one-batch" else None
    start = time.perf_counter()
    packed = pack_dataset(dataset, MAX_SEQ_LEN, "bfd", map_kwargs)
    seconds = time.perf_counter() - start
    rss = _peak_rss_mb()
    row_off, piece_len = _list_column(packed.data, "seq_lengths")
    tokens_off, _ = _list_column(packed.data, "input_ids")
    result = packing(n, lengths, row_off, piece_len.astype(np.int64))
    if not np.array_equal(np.diff(tokens_off), np.add.reduceat(piece_len.astype(np.int64), row_off[:-1])):
        raise AssertionError("TRL's seq_lengths do not add up to its rows' lengths")
    check_trl_tokens(source, packed)
    return {**result, "seconds": seconds, "rss_mb": rss}


def run_worker(spec: dict, tmp: Path) -> dict:
    """One configuration in a fresh subprocess: what it reports, and its wall seconds as process_s."""
    env = subprocess_env(HF_DATASETS_CACHE=str(tmp / "cache"), TMPDIR=str(tmp))
    log = tmp / "worker.log"
    # No tree sampling: the worker times itself, and a sampler would share the cores with it.
    result = run_measured([sys.executable, "-m", "bench.pack", "--worker", json.dumps(spec)], env=env, log=log,
                          sample_tree=False)
    return {**last_json(log.read_text()), "process_s": result["wall_s"]}


# -- driver and report ----------------------------------------------------------------------------
def tasks_for(n: int, trl_one_batch_max: int, pack_max: int) -> list[str]:
    return [t for t in TASKS if not (t == "trl-one-batch" and n > trl_one_batch_max)
            and not (t == "pack" and n > pack_max)]


def benchmark(sizes: list[int], repeat: int, trl_one_batch_max: int, pack_max: int, console) -> list[dict]:
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="sft-bench-pack-"))
    try:
        for n in sizes:
            tasks = tasks_for(n, trl_one_batch_max, pack_max)
            data = tmp / f"split-{n}.arrow"
            if any(TASKS[t][1] for t in tasks):
                start = time.perf_counter()
                write_split(data, n)
                os.sync()  # its writeback must not land in the first timed run
                console.print(f"{n:,} examples: wrote the token file ({data.stat().st_size / 2**20:,.0f} MB) "
                              f"in {time.perf_counter() - start:.1f} s")
            for task in tasks:
                best = None
                for attempt in range(repeat):
                    out = tmp / f"out-{n}-{task}-{attempt}"
                    out.mkdir()
                    result = run_worker({"task": task, "n": n, "seed": SEED, "data": str(data), "out": str(out)}, tmp)
                    shutil.rmtree(out)
                    os.sync()
                    console.print(f"  {n:>9,} {TASKS[task][0]:<24} {result['seconds']:7.2f} s  "
                                  f"{100 * result['efficiency']:.3f}%  {result['rows']:,} rows  "
                                  f"{result['rss_mb']:,.0f} MB")
                    if best is None or result["seconds"] < best["seconds"]:
                        best = result
                results.append({"n": n, "task": task, **best})
            data.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


HEADER = ["examples", "side", "rows", "efficiency", "examples/row (mean, max)", "split or truncated",
          "seconds", "examples/s", "peak RSS MB"]


def table_rows(results: list[dict]) -> list[list[str]]:
    return [[f"{r['n']:,}", TASKS[r["task"]][0], f"{r['rows']:,}", f"{100 * r['efficiency']:.2f}%",
             f"{r['per_row_mean']:.2f}, {r['per_row_max']}", f"{r['split']:,}" if r["split"] else "none",
             f"{r['seconds']:.2f}", f"{r['n'] / r['seconds']:,.0f}", f"{r['rss_mb']:,.0f}"] for r in results]


VS_HEADER = ["examples", "rows: ours / TRL", "efficiency: ours, TRL", "seconds: sft pack, TRL", "speed: ours/TRL"]


def versus(results: list[dict]) -> list[list[str]]:
    """Per size: `sft pack` (or plan_rows when it did not run) against TRL's default bfd."""
    out = []
    for n in dict.fromkeys(r["n"] for r in results):
        by = {r["task"]: r for r in results if r["n"] == n}
        ours, trl = by.get("pack") or by.get("plan"), by.get("trl")
        if not ours or not trl:
            continue
        out.append([f"{n:,}", f"{ours['rows']:,} / {trl['rows']:,} ({100 * (ours['rows'] / trl['rows'] - 1):+.2f}%)",
                    f"{100 * ours['efficiency']:.2f}%, {100 * trl['efficiency']:.2f}%",
                    f"{ours['seconds']:.2f}{'' if ours['task'] == 'pack' else ' (plan_rows)'}, {trl['seconds']:.2f}",
                    f"{trl['seconds'] / ours['seconds']:.1f}x"])
    return out


def goals(results: list[dict]) -> list[str]:
    bfd = [r for r in results if r["task"] in ("bins", "plan", "pack")]
    low = min(bfd, key=lambda r: r["efficiency"])
    lines = [f"Efficiency >= 99%: {'met' if low['efficiency'] >= 0.99 else 'NOT met'} (lowest: "
             f"{100 * low['efficiency']:.2f}% at {low['n']:,} examples)."]
    big = [r for r in results if r["n"] >= 1_000_000 and r["task"] in ("pack", "plan")]
    if big:
        n = min(r["n"] for r in big)
        timed = {r["task"]: r["seconds"] for r in big if r["n"] == n}
        plan = f"plan_rows {timed['plan']:.1f} s ({'met' if timed['plan'] < 60 else 'NOT met'})"
        full = (f"; end to end (`sft pack`'s path per split: `pack_split`) {timed['pack']:.1f} s "
                f"({'met' if timed['pack'] < 60 else 'NOT met'})") if "pack" in timed else ""
        lines.append(f"{n:,} examples packed in < 60 s on this machine: {plan}{full}.")
    else:
        lines.append("1M examples packed in < 60 s: not measured (no size >= 1,000,000 in this run).")
    return lines


def section(results: list[dict], sizes: list[int], repeat: int, trl_one_batch_max: int, pack_max: int,
            command: str) -> str:
    skipped = [f"{TASKS[t][0]} at {n:,}" for n in sizes for t in TASKS if t not in tasks_for(n, trl_one_batch_max,
                                                                                              pack_max)]
    parts = [f"{r['n']:,}: {r['read_seconds']:.2f} + {r['plan_seconds']:.2f} + {r['write_seconds']:.2f} s"
             for r in results if r["task"] == "pack"]
    lengths, _ = lengths_of(max(sizes))
    pairs = [(r, next(o for o in results if o["n"] == r["n"] and o["task"] == "bins"))
             for r in results if r["task"] == "trl-one-batch" and any(o["n"] == r["n"] and o["task"] == "bins"
                                                                      for o in results)]
    same = ""
    if pairs:
        equal = all(t["rows"] == o["rows"] for t, o in pairs)
        same = (f"{'the same' if equal else 'NOT the same'} number of rows as `bfd_bins` at "
                + ", ".join(f"{t['n']:,}" for t, _ in pairs) + " examples")
    notes = [
        "**seconds**: the packing call alone, in a fresh subprocess (imports, building the data and the checks "
        "are outside it). ours bfd_bins = `bfd_bins(lengths, 2048)`; ours plan_rows = `plan_rows(lengths, "
        "strategy, 2048, seed)` (bins, then the rows shuffled, as a `Plan`: flat example, start, stop arrays); ours sft pack = "
        "`pack_split(split, \"bfd\", 2048, seed, folder, ...)`, i.e. everything `sft pack` runs per split: the "
        "lengths read, `plan_rows`, and the rows written as a Dataset folder of input_ids/labels/position_ids/"
        "seq_lens/example_ids that `load_from_disk` reads (no `save_to_disk` copy after it); trl = "
        "`pack_dataset(dataset, 2048, \"bfd\")` on the "
        "split's input_ids + labels, output (input_ids, labels, seq_lengths) written to a datasets cache file.",
        "ours sft pack, split into its steps: reading the lengths and where each example's tokens lie "
        "(`_locate`: the Arrow files' layout and list offsets, no tokens) + `plan_rows` + `_write_split` (tokens "
        "read with pread, rows built with numpy, written block by block): "
        + ("; ".join(parts) or "not run") + ".",
        "TRL's default runs `datasets.map` in batches of 1,000 examples (what SFTTrainer does) and packs each "
        "batch on its own, so every batch ends with part-filled rows; \"trl bfd, one batch\" passes "
        "`map_kwargs={\"batch_size\": None}`: one BFD over everything, the same algorithm as ours"
        + (f" ({same})." if same else "."),
        "TRL adds position_ids and masks the label at each example start in its collator, per batch; ours "
        "writes both (and example_ids) into the packed rows, so `sft pack` writes more columns than TRL.",
        "**split or truncated**: examples cut across rows or shortened. Checked in every run: each example in "
        "exactly one row, whole, no row over 2048 tokens; `sft pack` rows spot-checked token for token (300 rows: "
        "input_ids, labels with -100 at each example start, position_ids); TRL's pieces matched one to one with "
        "the source examples by (length, sum of ids, sum of labels). TRL's bfd truncates examples over 2048 "
        "tokens; none is over 2048 here, and it truncated nothing. `wrapped` splits examples by design.",
        "**peak RSS**: the subprocess's high-water mark (getrusage), the memory-mapped source pages it touched "
        "included: TRL reads the split through its memory map; `sft pack` reads tokens with pread, which leaves "
        "them in the page cache, outside its RSS.",
    ]
    if skipped:
        notes.append(f"Not run (memory, see --trl-one-batch-max / --sft-pack-max): {'; '.join(skipped)}.")
    return "\n".join([
        "## pack", "",
        f"`sft pack`'s best-fit-decreasing packing against TRL's `pack_dataset(strategy=\"bfd\")` at max_seq_len "
        f"{MAX_SEQ_LEN}, on the same seeded LIMA-like lengths: prompt ~30 tokens (lognormal, 1-400) + response "
        f"(lognormal, median 250, sigma 0.8, at most 2,000), total clipped to [2, 2048] (at {max(sizes):,} "
        f"examples: median {int(np.median(lengths))}, mean {lengths.mean():.0f}, max {int(lengths.max())} tokens). "
        "Both sides read the same Arrow split file of random token ids (input_ids, labels masked over "
        "the prompt, num_tokens) from the page cache: TRL through a memory map, `sft pack` with pread. Efficiency = real tokens / (rows x 2048). "
        + (f"Best of {repeat} runs each." if repeat > 1 else "One run each."), "",
        *(f"- {line}" for line in goals(results)), "",
        markdown(HEADER, table_rows(results)), "",
        "Ours against TRL's default bfd (speed: TRL's seconds / ours):", "",
        markdown(VS_HEADER, versus(results)), "",
        *(f"- {n}" for n in notes), "",
        f"Command: `{command}` (`make bench-pack` runs the default sizes).", "",
        f"Machine: {machine(('numpy', 'pyarrow', 'datasets', 'trl'), load=True)}.", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="numbers of examples")
    parser.add_argument("--repeat", type=int, default=1, help="run every configuration N times, keep the fastest")
    parser.add_argument("--trl-one-batch-max", type=int, default=DEFAULT_TRL_ONE_BATCH_MAX,
                        help="largest size for TRL's single-batch variant (it holds everything in memory)")
    parser.add_argument("--sft-pack-max", type=int, default=max(DEFAULT_SIZES),
                        help="largest size for the end-to-end `sft pack` run")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one configuration, JSON spec
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    sizes = sorted(set(args.sizes))
    results = benchmark(sizes, args.repeat, args.trl_one_batch_max, args.sft_pack_max, console)
    for title, header, body in ((f"sft pack vs TRL bfd (max_seq_len {MAX_SEQ_LEN})", HEADER, table_rows(results)),
                                ("ours vs TRL's default bfd", VS_HEADER, versus(results))):
        print_table(console, title, header, body, left=("side",))
    for line in goals(results):
        console.print(line)
    command = PROG + (
        f" --sizes {' '.join(map(str, sizes))}" if sizes != list(DEFAULT_SIZES) else "") + (
        f" --repeat {args.repeat}" if args.repeat > 1 else "") + (
        f" --trl-one-batch-max {args.trl_one_batch_max}" if args.trl_one_batch_max != DEFAULT_TRL_ONE_BATCH_MAX
        else "") + (f" --sft-pack-max {args.sft_pack_max}" if args.sft_pack_max != max(DEFAULT_SIZES) else "")
    if not args.no_write:
        path = write_section("pack", section(results, sizes, args.repeat, args.trl_one_batch_max, args.sft_pack_max,
                                             command))
        console.print(f"wrote the pack section of {path}")


if __name__ == "__main__":
    main()
