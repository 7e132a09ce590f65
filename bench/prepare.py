"""Benchmark: `sft prepare` against TRL's SFTTrainer dataset preparation, same data, same tokenizer.

Generates N seeded synthetic conversations (OpenAI `messages` JSONL: mostly one turn, some two
or three, some with a system prompt; replies of lognormal length), then runs each side in a
fresh subprocess with cold caches, once with 1 worker process and once with 2:

    ours  python -m sft_cli prepare model.name_or_path=... data.sources=[{path: FILE}] max_seq_len=2048
          data.dedupe=true data.num_proc=N   (wall time; and wall minus the CLI's startup, a `--cfg job` call)
    trl   datasets.load_dataset("json") + SFTTrainer._prepare_dataset, SFTConfig(max_length=2048,
          packing=False, dataset_num_proc=N)   (wall time; and the tokenizer + load + prepare work alone)

TRL runs twice per worker count: with its default loss (the whole conversation, no mask to
compute) and with assistant_only_loss=True on a copy of the same chat template with
`{% generation %}` markers added (TRL needs them; the stock template renders the same text).
Throughput, token counts, peak memory and the speed ratio go into the "## prepare" section of
BENCHMARKS.md and a table on the terminal.

A floor is measured once, in its own process: each conversation rendered once with
`apply_chat_template` and those texts tokenized once by the Rust tokenizer alone, the least any exact
preparation does (TRL and ours both tokenize every token at least once); the section says how much of
ours' time is left besides it.

    python -m bench.prepare             # 100,000 rows, ~10 minutes on 2 cores (make bench-prepare)
    python -m bench.prepare --quick     # 10,000 rows
    python -m bench.prepare --repeat 2  # every configuration twice, the faster run kept
    python -m bench.prepare --data agentic --rows 5000   # tool calls + reasoning on Qwen3's template
    python -m bench.prepare --rows 200 --no-write        # a quick check: BENCHMARKS.md untouched

`--data agentic` generates tool-calling conversations with reasoning (a `tools` list, calls with
arguments, tool results, `reasoning_content` on every reply, two user turns) and prepares them on
TRL's own Qwen3 template: ours with the stock `qwen3.jinja` (its history drops old reasoning, so
turns get their own examples), TRL with assistant_only_loss on its `qwen3_training.jinja` twin
(`{% generation %}` markers; old reasoning is simply not trained there). Section "## prepare (tool
calls and reasoning)".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench.common import (
    FALLBACK_MODEL,
    SEED,
    generate,
    last_json,
    machine,
    markdown,
    marked_template,
    pick_model,
    print_table,
    prose,
    run_measured,
    subprocess_env,
    write_section,
)

PROG = "python -m bench.prepare"
MAX_SEQ_LEN = 2048
PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "trl")  # versions on the Machine line
CITIES = ["Paris", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth", "Dakar"]
AGENT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"}, "unit": {"type": "string"}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                     "required": ["query"]}}}]


def generate_agentic(path: Path, rows: int, seed: int = SEED) -> None:
    """`rows` tool-calling conversations with reasoning: user asks, the assistant thinks and calls one or
    two tools, reads the results, thinks and answers; a second user turn gets a reasoned answer."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for i in range(rows):
            calls = []
            for k in range(int(rng.choice([1, 2], p=[0.7, 0.3]))):
                if rng.random() < 0.6:
                    calls.append({"id": f"c{i}_{k}", "type": "function", "function": {
                        "name": "get_weather", "arguments": {"city": CITIES[int(rng.integers(len(CITIES)))],
                                                             "unit": "celsius"}}})
                else:
                    calls.append({"id": f"c{i}_{k}", "type": "function", "function": {
                        "name": "search", "arguments": json.dumps({"query": prose(rng, 6)})}})  # JSON text
            messages = [{"role": "user", "content": prose(rng, int(rng.integers(8, 40)))},
                        {"role": "assistant", "content": None, "tool_calls": calls,
                         "reasoning_content": prose(rng, int(rng.integers(20, 120)))}]
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": prose(rng, int(rng.integers(10, 60)))}
                         for c in calls]
            messages += [{"role": "assistant", "content": prose(rng, int(rng.integers(20, 150))),
                          "reasoning_content": prose(rng, int(rng.integers(20, 150)))},
                         {"role": "user", "content": prose(rng, int(rng.integers(5, 30)))},
                         {"role": "assistant", "content": prose(rng, int(rng.integers(20, 150))),
                          "reasoning_content": prose(rng, int(rng.integers(20, 150)))}]
            handle.write(json.dumps({"tools": AGENT_TOOLS, "messages": messages}) + "\n")


def trl_template(name: str) -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"


# -- measurement ----------------------------------------------------------------------------------
def measure(cmd: list[str], tmp: Path, log: Path) -> dict:
    """run_measured in `tmp` with a fresh datasets cache: nothing from an earlier run is reused."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=tmp))
    try:
        return run_measured(cmd, env=subprocess_env(HF_DATASETS_CACHE=str(cache)), cwd=tmp, log=log)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _ours_cmd(model: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    # `extra` goes last: Hydra's argparse rejects overrides that follow `--cfg job`.
    return [sys.executable, "-m", "sft_cli", "prepare", f"model.name_or_path={model}",
            f"data.sources=[{{path: {data}}}]", f"run_dir={run_dir}", f"max_seq_len={MAX_SEQ_LEN}",
            "data.dedupe=true", *extra]


def ours_startup(model: str, data: Path, tmp: Path) -> float:
    """The CLI's fixed cost (interpreter, Hydra, config composition): best of three `--cfg job` calls."""
    return min(measure(_ours_cmd(model, data, tmp / "startup", "--cfg", "job"), tmp, tmp / "startup.log")["wall_s"]
               for _ in range(3))


def import_cost(tmp: Path) -> float:
    """What importing datasets + torch + transformers costs (the CLI's tokenizer load pulls in torch):
    inside our "work", outside TRL's. Best of two."""
    cmd = [sys.executable, "-c", "import datasets, torch, transformers"]
    return min(measure(cmd, tmp, tmp / "imports.log")["wall_s"] for _ in range(2))


def run_ours(model: str, data: Path, num_proc: int, tmp: Path, startup: float, *extra: str) -> dict:
    run_dir = tmp / f"ours-{num_proc}"  # fresh: prepare's output cache is cold
    result = measure(_ours_cmd(model, data, run_dir, f"data.num_proc={num_proc}", *extra), tmp,
                     tmp / f"ours-{num_proc}.log")
    report = json.loads((run_dir / "prepared" / "report.json").read_text())
    shutil.rmtree(run_dir)
    return {**result, "work_s": result["wall_s"] - startup, "examples": report.get("examples", report["kept"]),
            "tokens": report["train_tokens"] + report["eval_tokens"],
            "loss_tokens": report["train_loss_tokens"] + report["eval_loss_tokens"]}


def run_trl(tokenizer_dir: str, model_dir: str, data: Path, num_proc: int, template: Path | None,
            tmp: Path, assistant_only: bool | None = None) -> dict:
    """TRL on `template` (None: the tokenizer's own); assistant_only_loss defaults to "a template was given"."""
    assistant_only = bool(template) if assistant_only is None else assistant_only
    name = f"trl-{'assistant' if assistant_only else 'all'}-{num_proc}"
    cmd = [sys.executable, "-m", "bench.prepare", "--trl-worker", json.dumps({
        "data": str(data), "tokenizer": tokenizer_dir, "model": model_dir, "num_proc": num_proc,
        "template": str(template) if template else None, "assistant_only": assistant_only,
        "output_dir": str(tmp / name)})]
    log = tmp / f"{name}.log"
    return {**measure(cmd, tmp, log), **last_json(log.read_text())}


def trl_worker(spec: dict) -> None:
    """In a subprocess: TRL's own preparation of `messages` data, as SFTTrainer does it in __init__.

    The trainer is built first on a one-row placeholder with preparation skipped, then
    `_prepare_dataset` (the method __init__ calls) runs on the real data: so model loading and
    trainer setup stay outside the timed work, and every setting is TRL's own."""
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if spec["template"]:
        tokenizer.chat_template = Path(spec["template"]).read_text()
    tokenizer_s = time.perf_counter() - start

    args = SFTConfig(output_dir=spec["output_dir"], max_length=MAX_SEQ_LEN, packing=False,
                     assistant_only_loss=spec["assistant_only"], dataset_num_proc=spec["num_proc"],
                     report_to="none", dataset_kwargs={"skip_prepare_dataset": True},
                     bf16=False)  # TRL defaults to bf16, which a CPU-only machine rejects; prep ignores it
    placeholder = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"}]}])
    # The tiny model: only its config is touched, and its few KB keep model weights out of the peak RSS.
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(spec["model"]), args=args,
                         train_dataset=placeholder, processing_class=tokenizer)

    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train")
    rows = len(dataset)
    dataset = trainer._prepare_dataset(dataset, tokenizer, args, args.packing, None, "train")
    work = tokenizer_s + time.perf_counter() - start
    tokens = pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py()
    labels = pc.list_flatten(dataset.data.column("labels"))
    loss_tokens = pc.sum(pc.not_equal(labels, -100).cast("int64")).as_py()
    print(json.dumps({"work_s": work, "rows": rows, "examples": len(dataset), "tokens": tokens,
                      "loss_tokens": loss_tokens}))


def run_floor(tokenizer_dir: str, data: Path, template: Path | None, tmp: Path) -> dict:
    """What any exact preparation spends at least: each conversation rendered once and tokenized once."""
    cmd = [sys.executable, "-m", "bench.prepare", "--floor-worker", json.dumps({
        "data": str(data), "tokenizer": tokenizer_dir, "template": str(template) if template else None})]
    log = tmp / "floor.log"
    measure(cmd, tmp, log)
    return last_json(log.read_text())


def floor_worker(spec: dict) -> None:
    """In a subprocess: one `apply_chat_template` render per row, then the Rust tokenizer alone on those
    texts (`encode_batch` in batches of 512, one thread, offsets made but not read), each timed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if spec["template"]:
        tokenizer.chat_template = Path(spec["template"]).read_text()
    with open(spec["data"]) as handle:
        rows = [json.loads(line) for line in handle]
    start = time.perf_counter()
    texts = [tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False) for row in rows]
    render_s = time.perf_counter() - start
    backend, tokens = tokenizer.backend_tokenizer, 0
    start = time.perf_counter()
    for lo in range(0, len(texts), 512):
        tokens += sum(len(e) for e in backend.encode_batch(texts[lo:lo + 512], add_special_tokens=False))
    print(json.dumps({"render_s": render_s, "tokenize_s": time.perf_counter() - start, "tokens": tokens}))


def floor_note(floor: dict, results: list[dict]) -> str:
    """Where the time goes: the floor against ours and TRL (loss on assistant, else on all) at num_proc 1."""
    ours = next(r for r in results if r["side"] == "sft prepare" and r["num_proc"] == 1)
    trl = next((r for loss in ("assistant", "all") for r in results
                if r["side"] == "trl" and r["loss"] == loss and r["num_proc"] == 1), None)
    per_token_us = 1e6 * floor["tokenize_s"] / max(floor["tokens"], 1)
    note = (f"**Floor** (one process): rendering each conversation once with `apply_chat_template` takes "
            f"{floor['render_s']:.1f} s and tokenizing those texts once with the Rust tokenizer alone "
            f"{floor['tokenize_s']:.1f} s ({floor['tokens']:,} tokens, {per_token_us:.2f} µs per token); "
            f"ours at num_proc 1 spends {ours['work_s']:.1f} s in all")
    if trl:
        note += (f", TRL (loss on {trl['loss']}) {trl['work_s']:.1f} s: 2x TRL would leave ours "
                 f"{trl['work_s'] / 2:.1f} s, {trl['work_s'] / 2 - floor['tokenize_s']:.1f} s of it besides "
                 "tokenizing")
    return note + "."


# -- report ---------------------------------------------------------------------------------------
def rows_of(results: list[dict], rows: int) -> list[list[str]]:
    table = []
    for r in results:
        table.append([r["side"], str(r["num_proc"]), r["loss"], f"{r['wall_s']:.1f}", f"{r['work_s']:.1f}",
                      f"{rows / r['work_s']:,.0f}", f"{r['tokens'] / r['work_s']:,.0f}",
                      f"{r['examples']:,}", f"{r['tokens']:,}",
                      f"{r['loss_tokens']:,}",
                      f"{r['rss_mb']:,.0f}", f"{r['tree_rss_mb']:,.0f}"])
    return table


HEADER = ["side", "num_proc", "loss on", "wall s", "work s", "examples/s", "tokens/s", "examples out",
          "tokens out", "loss tokens", "RSS MB", "tree RSS MB"]


RATIO_HEADER = ["num_proc", "vs", "ours/TRL (work)", "ours/TRL (wall)"]


def ratios(results: list[dict]) -> list[list[str]]:
    """ours/TRL examples per second, on work time and on wall time, per worker count and TRL variant."""
    out = []
    for ours in (r for r in results if r["side"] == "sft prepare"):
        for trl in (r for r in results if r["side"] == "trl" and r["num_proc"] == ours["num_proc"]):
            out.append([str(ours["num_proc"]), f"TRL, loss on {trl['loss']}",
                        f"{trl['work_s'] / ours['work_s']:.2f}x", f"{trl['wall_s'] / ours['wall_s']:.2f}x"])
    return out


def benchmark(rows: int, repeat: int, console, kind: str = "chat") -> dict:
    """Generate the data, run every configuration `repeat` times, keep each one's fastest run."""
    from transformers import AutoTokenizer

    from sft_cli.assets import resolve_model

    model, model_dir, note = pick_model()
    if note:
        console.print(f"[yellow]{note}[/]")
    tiny_dir = resolve_model(FALLBACK_MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="sft-bench-prepare-"))
    try:
        data = tmp / "chats.jsonl"
        console.print(f"generating {rows:,} {kind} conversations -> {data}")
        ours_extra: tuple[str, ...] = ()
        trl_all_template = None
        if kind == "agentic":
            generate_agentic(data, rows)
            ours_extra = (f"data.chat_template={trl_template('qwen3')}",)
            template, trl_all_template = trl_template("qwen3_training"), trl_template("qwen3")
        else:
            generate(data, rows)
            with open(data) as handle:
                sample = [json.loads(next(handle))["messages"] for _ in range(min(rows, 500))]
            marked = marked_template(AutoTokenizer.from_pretrained(model_dir), sample)
            template = None
            if marked is None:
                note += " TRL's assistant_only_loss run skipped: could not add {% generation %} markers to this template."
            else:
                template = tmp / "marked.jinja"
                template.write_text(marked)

        startup, imports = ours_startup(model, data, tmp), import_cost(tmp)
        console.print(f"sft CLI startup (`--cfg job`): {startup:.2f} s; importing datasets+torch+transformers: "
                      f"{imports:.2f} s")
        floor = run_floor(model_dir, data, trl_all_template, tmp)
        console.print(f"floor: one render per row {floor['render_s']:.1f} s, the tokenizer alone "
                      f"{floor['tokenize_s']:.1f} s ({floor['tokens']:,} tokens)")
        configs = []
        for num_proc in (1, 2):
            configs += [("sft prepare", "assistant", num_proc,
                         partial(run_ours, model, data, num_proc, tmp, startup, *ours_extra)),
                        ("trl", "all", num_proc,
                         partial(run_trl, model_dir, tiny_dir, data, num_proc, trl_all_template, tmp, False))]
            if template:
                configs.append(("trl", "assistant", num_proc,
                                partial(run_trl, model_dir, tiny_dir, data, num_proc, template, tmp)))
        best: dict[tuple, dict] = {}
        for attempt in range(repeat):  # whole rounds: a slow spell of the machine hits every side alike
            for side, loss, num_proc, run in configs:
                console.print(f"[{attempt + 1}/{repeat}] {side} (loss on {loss}) num_proc={num_proc} ...")
                result = {"side": side, "loss": loss, "num_proc": num_proc, **run()}
                console.print(f"  {result['wall_s']:.1f} s wall, {result['work_s']:.1f} s work")
                key = (side, loss, num_proc)
                if key not in best or result["work_s"] < best[key]["work_s"]:
                    best[key] = result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"model": model, "note": note.strip(), "startup": startup, "imports": imports,
            "results": list(best.values()), "kind": kind, "floor": floor}


def agentic_section(bench: dict, rows: int, repeat: int, command: str) -> str:
    results = bench["results"]
    return "\n".join([
        "## prepare (tool calls and reasoning)", "",
        f"`sft prepare` against TRL's `SFTTrainer` preparation on {rows:,} synthetic agentic conversations "
        "(seeded: a `tools` list of two functions; the assistant reasons and calls one or two tools, arguments "
        "as objects or JSON text; tool results; a reasoned answer; a second user turn with a reasoned answer), "
        f"tokenizer `{bench['model']}`, TRL's own Qwen3 template, max_seq_len {MAX_SEQ_LEN}, no packing. "
        "Fresh subprocesses, cold caches, one tokenizer thread. " + (f"Best of {repeat} rounds." if repeat > 1
                                                                      else "One run each."), "",
        "- Ours: `data.chat_template=qwen3.jinja` (the stock template). Qwen3 drops the reasoning of turns before "
        "the last user message, so each such turn is trained in its own example, rendered as inference saw it: "
        "\"examples out\" is larger than the row count, and so are the tokens.",
        "- TRL, loss on assistant: `assistant_only_loss=True` on `qwen3_training.jinja`, its `{% generation %}` "
        "twin, which is prefix-preserving: it keeps every turn's reasoning in the history, where the stock "
        "template (and so inference) drops it. One example per row, so fewer tokens; its replies are trained "
        "after a history unlike the one the model sees at inference. TRL, loss on all: the stock template, no mask.",
        "- **work** and **wall** as in the section above.",
        f"- {floor_note(bench['floor'], results)}", "",
        markdown(HEADER, rows_of(results, rows)), "",
        "Speed ratio (ours / TRL, input rows per second):", "",
        markdown(RATIO_HEADER, ratios(results)), "",
        f"Command: `{command}`.", "", f"Machine: {machine(PACKAGES)}.", ""])


def section(bench: dict, rows: int, repeat: int, command: str) -> str:
    results = bench["results"]
    masked = {r["loss_tokens"] for r in results if r["loss"] == "assistant"}
    same_mask = (f" Both sides' assistant masks train the same {masked.pop():,} tokens."
                 if len(masked) == 1 and any(r["side"] == "trl" and r["loss"] == "assistant" for r in results) else "")
    notes = [
        f"**wall**: process start to exit, imports included. **work**: ours = wall minus the CLI's startup "
        f"(a `--cfg job` call, {bench['startup']:.2f} s), so it still holds importing `datasets`/`torch`/"
        f"`transformers` ({bench['imports']:.2f} s on their own); TRL = tokenizer load + `load_dataset(\"json\")` + "
        "`_prepare_dataset` (imports, model load and trainer setup left out).",
        "examples/s (input rows) and tokens/s (the `input_ids` each side produced) are on work time. "
        "RSS MB: the largest single process (exact, from `wait4`); tree RSS MB: summed over the process and its "
        "workers (sampled every 50 ms; pages shared after `fork` count once per process).",
        "Ours also validates rows, dedupes, shuffles and writes `prepared/` (+ report, rejected rows) to disk. "
        "\"TRL, loss on all\" is its default for `messages` data: no mask at all. \"TRL, loss on assistant\" is "
        "`assistant_only_loss=True` with `{% generation %}` markers added to a copy of the same template (TRL "
        "requires them; the text renders identically)." + same_mask,
        floor_note(bench["floor"], results),
    ] + ([f"**Note:** {bench['note']}"] if bench["note"] else [])
    return "\n".join([
        "## prepare", "",
        f"`sft prepare` against TRL's `SFTTrainer` dataset preparation (`_prepare_dataset`, what its `__init__` "
        f"runs) on {rows:,} synthetic conversations (seeded: 75% one turn, 18% two, 7% three; 20% with a system "
        f"prompt; replies ~150 words, lognormal), tokenizer `{bench['model']}`, max_seq_len {MAX_SEQ_LEN}, no "
        "packing. Each run is a fresh subprocess with a cold cache and one tokenizer thread "
        "(`TOKENIZERS_PARALLELISM=false`), so num_proc is the number of cores used. "
        + (f"Best of {repeat} rounds." if repeat > 1 else "One run each."), "",
        *(f"- {n}" for n in notes), "",
        markdown(HEADER, rows_of(results, rows)), "",
        "Speed ratio (ours / TRL, examples per second; goal >= 2x):", "",
        markdown(RATIO_HEADER, ratios(results)), "",
        f"Command: `{command}` (`make bench-prepare` runs the 100,000-row default).", "",
        f"Machine: {machine(PACKAGES)}.", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="10,000 rows")
    parser.add_argument("--repeat", type=int, default=1, help="run every configuration N times, keep the fastest")
    parser.add_argument("--data", choices=("chat", "agentic"), default="chat",
                        help="plain chats, or tool calls + reasoning on Qwen3's template")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md alone")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)  # internal: one TRL run, JSON spec
    parser.add_argument("--floor-worker", help=argparse.SUPPRESS)  # internal: render + tokenize alone, JSON spec
    args = parser.parse_args(argv)
    if args.trl_worker:
        return trl_worker(json.loads(args.trl_worker))
    if args.floor_worker:
        return floor_worker(json.loads(args.floor_worker))
    rows = 10_000 if args.quick else args.rows
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)  # logs get the whole table
    bench = benchmark(rows, args.repeat, console, args.data)
    for title, header, body in (("sft prepare vs TRL", HEADER, rows_of(bench["results"], rows)),
                                ("speed ratio", RATIO_HEADER, ratios(bench["results"]))):
        print_table(console, f"{title} ({rows:,} conversations)", header, body, left=("side", "loss on", "vs"))

    command = (PROG + (" --data agentic" if args.data == "agentic" else "")
               + (" --quick" if args.quick else f" --rows {rows}" if rows != 100_000 else "")
               + (f" --repeat {args.repeat}" if args.repeat > 1 else ""))
    if args.no_write:
        return
    if args.data == "agentic":
        path = write_section("prepare (tool calls and reasoning)", agentic_section(bench, rows, args.repeat, command))
    else:
        path = write_section("prepare", section(bench, rows, args.repeat, command))
    console.print(f"wrote the prepare section of {path}")


if __name__ == "__main__":
    main()
