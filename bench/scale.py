"""Scale check: `sft prepare` and `sft pack` on 1M generated conversations, each under 2 GiB peak RSS.

Generates N seeded synthetic conversations as OpenAI `messages` JSONL (1 to 4 turns, a system
prompt in a quarter of them, Zipf-distributed words, lognormal lengths) with ~1% deliberately bad
rows of seven kinds (malformed JSON, invalid UTF-8, empty content, an unknown role, ending on a
user turn, overlong, exact duplicates) and a few blank lines, so the rejection bookkeeping runs at
scale too. Then runs the real CLI, each verb in its own subprocess, on a recipe with the tiny
offline tokenizer (builtin:tiny-llama-chatml) and max_seq_len 1024:

    sft prepare recipe=scale.yaml    then    sft pack recipe=scale.yaml

and measures each for wall seconds and peak RSS of the whole process tree (tokenizer workers
included; see bench.common.run_measured). The reports are checked against what was generated
(every non-blank line read, each injected bad row rejected for its reason, every kept example
packed), the "## scale" section of BENCHMARKS.md is rewritten, and the exit code is 0 only when
both stages stay under the limit.

    python -m bench.scale                                  # 1,000,000 rows (make bench-scale)
    python -m bench.scale --rows 100000 --json scale.json  # the numbers as JSON too
    python -m bench.scale --rows 10000 --keep              # keep the temp folder to inspect
    python -m bench.scale --rows 2000 --no-write           # a quick check: BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import (
    SEED,
    SYSTEM_PROMPTS,
    WORDS,
    ZIPF,
    machine,
    markdown,
    print_table,
    run_measured,
    subprocess_env,
    write_section,
)

MODEL = "builtin:tiny-llama-chatml"
MAX_SEQ_LEN = 1024
LIMIT_MB = 2048
# The same run before the data-pipeline speed work (2026-12-01, same machine): seconds per stage.
BEFORE_S = {"sft prepare": 348.0, "sft pack": 28.0}
BLOCK = 10_000  # rows generated per vectorised draw of words
BAD_FRACTION = 0.01
# Each bad kind is named after the reason prepare must report for it.
BAD_KINDS = ("malformed_json", "invalid_utf8", "empty_content", "unknown_role", "not_ending_with_assistant",
             "overlong", "duplicate")
# A row of at most this many words is far below max_seq_len (~2.4 tokens per word with the tiny
# tokenizer), so a duplicate of it is rejected as a duplicate and never as overlong.
SHORT_WORDS = 120


# -- data -----------------------------------------------------------------------------------------
def _sentence(words: list[str]) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _block_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(turns, prompt words, reply words) for n rows; the word arrays are (n, 4), unused turns 0."""
    turns = rng.choice([1, 2, 3, 4], size=n, p=[0.6, 0.25, 0.1, 0.05])
    used = np.arange(4)[None, :] < turns[:, None]
    prompt = np.clip(rng.lognormal(np.log(12), 0.6, (n, 4)), 2, 60).astype(int) * used
    # Replies share a ~300-word budget per row, so nearly every row fits 1024 tokens.
    reply = np.clip(rng.lognormal(np.log(40), 0.8, (n, 4)), 1, (300 // turns)[:, None]).astype(int) * used
    return turns, prompt, reply


def _conversations(rng: np.random.Generator, n: int):
    """n good conversations as (messages, word count), words drawn in one call for the block."""
    turns, prompt, reply = _block_lengths(rng, n)
    counts = np.stack([prompt, reply], axis=2).reshape(n, -1)  # per row: p0 r0 p1 r1 ...
    words = WORDS[rng.choice(len(WORDS), int(counts.sum()), p=ZIPF)].tolist()
    systems = rng.integers(-3 * len(SYSTEM_PROMPTS), len(SYSTEM_PROMPTS), n)  # < 0: none (~3 in 4)
    at = 0
    for i in range(n):
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[systems[i]]}] if systems[i] >= 0 else []
        for k, size in enumerate(counts[i, :2 * turns[i]].tolist()):
            messages.append({"role": ("user", "assistant")[k % 2], "content": _sentence(words[at:at + size])})
            at += size
        yield messages, int(counts[i].sum())


def _spoil(kind: str, messages: list[dict], rng: np.random.Generator) -> bytes:
    """A good conversation turned into one JSONL line that prepare must reject as `kind`."""
    if kind == "empty_content":
        messages[-1]["content"] = ""
    elif kind == "unknown_role":
        messages[-2]["role"] = "narrator"
    elif kind == "not_ending_with_assistant":
        messages.append({"role": "user", "content": "And then?"})
    elif kind == "overlong":  # ~2,400 tokens
        messages[-1]["content"] = _sentence(WORDS[rng.choice(len(WORDS), 1000, p=ZIPF)].tolist())
    line = json.dumps({"messages": messages}).encode()
    if kind == "malformed_json":
        return line[:len(line) // 2]
    if kind == "invalid_utf8":
        return line.replace(b'"content": "', b'"content": "\xff', 1)
    return line


def generate(path: Path, rows: int, seed: int = SEED) -> Counter:
    """`rows` non-blank JSONL lines (plus ~0.2% blank ones); returns how many of each bad kind."""
    rng = np.random.default_rng(seed)
    injected: Counter = Counter()
    last_short = None  # the latest short good line: what a `duplicate` repeats
    with open(path, "wb") as handle:
        for lo in range(0, rows, BLOCK):
            n = min(BLOCK, rows - lo)
            bad = np.where(rng.random(n) < BAD_FRACTION, rng.integers(0, len(BAD_KINDS), n), -1)
            blank = rng.random(n) < 0.002
            for i, (messages, n_words) in enumerate(_conversations(rng, n)):
                kind = BAD_KINDS[bad[i]] if bad[i] >= 0 else None
                if kind == "duplicate" and last_short is None:
                    kind = None  # nothing to repeat yet: a good row instead
                if kind == "duplicate":
                    line = last_short
                elif kind:
                    line = _spoil(kind, messages, rng)
                else:
                    line = json.dumps({"messages": messages}).encode()
                    if n_words <= SHORT_WORDS:
                        last_short = line
                if kind:
                    injected[kind] += 1
                handle.write(line + b"\n" + (b"\n" if blank[i] else b""))
    return injected


# -- the run --------------------------------------------------------------------------------------
def write_recipe(path: Path, data: Path, run_dir: Path) -> None:
    path.write_text(
        f"model:\n  name_or_path: {MODEL}\n"
        f"run_dir: {run_dir}\n"
        f"max_seq_len: {MAX_SEQ_LEN}\n"
        "data:\n"
        f"  sources:\n    - {{path: {data}, format: messages}}\n"
        "  eval_fraction: 0.01\n"
        "pack:\n  strategy: bfd\n")


def run_stage(verb: str, recipe: Path, tmp: Path) -> dict:
    """`sft VERB` in a subprocess: seconds, and peak RSS as the larger of the tree's and the largest process's."""
    env = subprocess_env(HF_DATASETS_CACHE=str(tmp / "hf-cache"))
    result = run_measured([sys.executable, "-m", "sft_cli", verb, f"recipe={recipe}"], env=env, cwd=tmp,
                          log=tmp / f"{verb}.log")
    return {"seconds": result["wall_s"], "peak_rss_mb": max(result["tree_rss_mb"], result["rss_mb"])}


def check_prepared(report: dict, rows: int, injected: Counter) -> None:
    """Every non-blank line read; each injected bad row rejected for its own reason."""
    reasons = report["rejected_by_reason"]
    problems = []
    if report["read"] != rows:
        problems.append(f"read {report['read']} rows, generated {rows}")
    if report["kept"] + report["rejected"] != report["read"]:
        problems.append(f"kept {report['kept']} + rejected {report['rejected']} != read {report['read']}")
    for kind in BAD_KINDS:
        got, want = reasons.get(kind, 0), injected[kind]
        # A generated row may come out over max_seq_len too: overlong counts at least the injected ones.
        if not (got >= want if kind == "overlong" else got == want):
            problems.append(f"{kind}: {got} rejected, {want} injected")
    if set(reasons) - set(BAD_KINDS):
        problems.append(f"unexpected rejection reasons: {sorted(set(reasons) - set(BAD_KINDS))}")
    if problems:
        raise SystemExit("prepare report check failed: " + "; ".join(problems))


def check_packed(report: dict, prepared: dict) -> None:
    """Every kept example packed whole, once, and BFD rows nearly full."""
    splits = report["splits"]
    examples = sum(s["examples"] for s in splits.values())
    tokens = sum(s["real_tokens"] for s in splits.values())
    problems = []
    if examples != prepared["kept"]:
        problems.append(f"packed {examples} examples, prepared kept {prepared['kept']}")
    if tokens != prepared["train_tokens"] + prepared["eval_tokens"]:
        problems.append(f"packed {tokens} tokens, prepared {prepared['train_tokens'] + prepared['eval_tokens']}")
    if splits["train"]["efficiency"] < 0.99:
        problems.append(f"train efficiency {splits['train']['efficiency']:.4f} < 0.99")
    if problems:
        raise SystemExit("pack report check failed: " + "; ".join(problems))


def benchmark(rows: int, tmp: Path, console) -> dict:
    data, run_dir, recipe = tmp / "conversations.jsonl", tmp / "run", tmp / "scale.yaml"
    with console.status(f"generating {rows:,} conversations"):
        injected = generate(data, rows)
    console.print(f"generated {rows:,} rows ({data.stat().st_size / 2**20:,.0f} MB), bad rows: {dict(injected)}")
    write_recipe(recipe, data, run_dir)
    from sft_cli.assets import resolve_model

    resolve_model(MODEL)  # build the tiny tokenizer now (once, cached), outside the timed runs

    with console.status("sft prepare"):
        prepare = run_stage("prepare", recipe, tmp)
    prepared = json.loads((run_dir / "prepared" / "report.json").read_text())
    check_prepared(prepared, rows, injected)
    console.print(f"prepare: {prepare['seconds']:.1f} s, peak RSS {prepare['peak_rss_mb']:,.0f} MB")
    with console.status("sft pack"):
        pack = run_stage("pack", recipe, tmp)
    if "prepared/ is up to date" not in (tmp / "pack.log").read_text():
        raise SystemExit("sft pack prepared the data again (did the code change during the run?), so its numbers "
                         "are not pack's alone")
    packed = json.loads((run_dir / "packed" / "report.json").read_text())
    check_packed(packed, prepared)
    console.print(f"pack: {pack['seconds']:.1f} s, peak RSS {pack['peak_rss_mb']:,.0f} MB")

    splits = packed["splits"].values()
    real = sum(s["real_tokens"] for s in splits)
    return {
        "rows": rows,
        "prepare": {"seconds": round(prepare["seconds"], 2), "peak_rss_mb": round(prepare["peak_rss_mb"], 1),
                    "kept": prepared["kept"], "rejected": prepared["rejected"], "read": prepared["read"],
                    "tokens": prepared["train_tokens"] + prepared["eval_tokens"]},
        "pack": {"seconds": round(pack["seconds"], 2), "peak_rss_mb": round(pack["peak_rss_mb"], 1),
                 "rows": sum(s["rows"] for s in splits),
                 "efficiency": real / sum(s["rows"] * MAX_SEQ_LEN for s in splits)},
        "limit_mb": LIMIT_MB,
        "passed": max(prepare["peak_rss_mb"], pack["peak_rss_mb"]) < LIMIT_MB,
        "rejected_by_reason": prepared["rejected_by_reason"],
    }


# -- reporting ------------------------------------------------------------------------------------
def table_rows(result: dict) -> list[list[str]]:
    def row(stage: str, rows: str, stats: dict) -> list[str]:
        ok = stats["peak_rss_mb"] < LIMIT_MB
        return [stage, rows, f"{BEFORE_S[stage]:.1f}", f"{stats['seconds']:.1f}", f"{stats['peak_rss_mb']:,.0f}",
                f"{LIMIT_MB:,}", "pass" if ok else "FAIL"]

    prep, pack = result["prepare"], result["pack"]
    return [row("sft prepare", f"{prep['read']:,} in, {prep['kept']:,} kept", prep),
            row("sft pack", f"{prep['kept']:,} in, {pack['rows']:,} packed", pack)]


HEADER = ["stage", "rows", "seconds before", "seconds", "peak RSS MB", "limit MB", "result"]


def section(result: dict, command: str) -> str:
    prep, pack = result["prepare"], result["pack"]
    reasons = ", ".join(f"{r} {c:,}" for r, c in result["rejected_by_reason"].items())
    return "\n".join([
        "## scale",
        "",
        f"`sft prepare` then `sft pack` (bfd) on {result['rows']:,} generated conversations (seeded OpenAI "
        "`messages` JSONL: 1-4 turns, a system prompt in ~1 of 4, Zipf words, lognormal lengths; ~1% bad rows "
        "of seven kinds and a few blank lines), tokenizer `builtin:tiny-llama-chatml`, max_seq_len "
        f"{MAX_SEQ_LEN}, eval_fraction 0.01, everything else default. Goal: peak RSS under {LIMIT_MB:,} MB "
        "(2 GiB) for each stage, and both faster than before the data-pipeline speed work (seconds before: "
        "the same command on 2026-12-01).",
        "",
        markdown(HEADER, table_rows(result)),
        "",
        f"- prepare: {prep['tokens']:,} tokens kept; rejected: {reasons} (each injected bad row under its own "
        "reason; overlong also counts generated rows that came out over max_seq_len). pack: "
        f"{pack['rows']:,} rows, {pack['efficiency']:.2%} efficiency.",
        "- **seconds**: the CLI subprocess from spawn to exit, imports included; pack's includes prepare's "
        "up-to-date check (re-hashing the source file). **peak RSS MB**: the larger of the process tree's summed "
        "RSS (sampled every 50 ms from /proc, tokenizer workers included) and the largest process's exact "
        "high-water mark (`wait4`). Both count the pages of memory-mapped Arrow files a process has read, and at "
        "scale those are most of prepare's peak: it reads its tokenized rows in shuffled order while writing "
        "prepared/. They are page cache the kernel can take back; heap, imports and tokenizer workers are the "
        "smaller part. pack reads prepared/'s input_ids and labels with pread, so they stay out of its RSS.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine(('datasets', 'pyarrow', 'numpy', 'tokenizers'), ram=True)}.",
    ])


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="conversations to generate")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (data, run_dir, logs)")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    tmp = Path(tempfile.mkdtemp(prefix="sft-scale-"))
    try:
        result = benchmark(args.rows, tmp, console)
    finally:
        if args.keep:
            console.print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    colored = [[*row[:-1], f"[green]{row[-1]}[/]" if row[-1] == "pass" else f"[red]{row[-1]}[/]"]
               for row in table_rows(result)]
    print_table(console, f"scale: {result['rows']:,} conversations", HEADER, colored, left=("stage", "rows"))
    if not args.no_write:
        write_section("scale", section(result, shlex.join(["python", "-m", "bench.scale", *argv])))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
