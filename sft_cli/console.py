"""Rich output shared by the verbs: summary tables, histograms, token-level views.

Results go to stdout (`out`), progress and diagnostics to stderr (`err`), so
`sft prepare ... > report.txt` keeps the tables and drops the chatter.
"""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)


def silence() -> None:
    """Ranks other than 0 of a multi-process job print nothing (errors go through cli.guarded)."""
    out.quiet = err.quiet = True


def print_prepared_reused(report: dict, folder: Path, fp: str) -> None:
    """One line instead of prepare's tables when prepared/ is reused (pack and train call prepare first)."""
    err.print(f"[green]prepared/ is up to date[/] ({folder}, fingerprint {fp}): {report['kept']:,} examples kept "
              f"of {report['read']:,} read ({report['train_examples']:,} train, {report['eval_examples']:,} eval), "
              f"{report['train_tokens'] + report['eval_tokens']:,} tokens, {report['rejected']:,} rejected")


def print_packed_reused(report: dict, folder: Path, fp: str) -> None:
    """One line instead of pack's table when packed/ is reused (train calls pack first)."""
    splits = ", ".join(f"{name} {s['rows']:,} rows ({s['efficiency']:.1%} full)" for name, s in report["splits"].items())
    err.print(f"[green]packed/ is up to date[/] ({folder}, fingerprint {fp}): {splits}, max_seq_len "
              f"{report['max_seq_len']}, {report['strategy']}")


def print_prepare_report(report: dict, folder: Path) -> None:
    sources = Table(title=f"sft prepare -> {folder}", title_justify="left")
    for column in ("source", "read", "kept", "rejected", "train", "eval", "weight", "train share"):
        sources.add_column(column, justify="left" if column == "source" else "right")
    train_total = max(report["train_examples"], 1)
    for name, s in report["sources"].items():
        sources.add_row(name, f"{s['read']:,}", f"{s['kept']:,}", f"{s['rejected']:,}", f"{s['train']:,}",
                        f"{s['eval']:,}", "-" if s["weight"] is None else f"{s['weight']:g}",
                        f"{100 * s['train'] / train_total:.1f}%")
    sources.add_row("[bold]total", f"{report['read']:,}", f"{report['kept']:,}", f"{report['rejected']:,}",
                    f"{report['train_examples']:,}", f"{report['eval_examples']:,}", "", "")
    out.print(sources)

    chat = {k: v for k, v in (report.get("chat") or {}).items() if isinstance(v, int) and v}
    if chat:
        labels = {"rows_with_tools": "rows with tools", "tool_calls_trained": "tool calls trained",
                  "turns_trained": "assistant turns trained", "reasoning_turns_trained": "reasoning turns trained",
                  "turn_examples": "per-turn examples added", "turn_example_tokens": "tokens in per-turn examples",
                  "empty_think_filled": "empty think blocks filled", "reasoning_inlined": "reasoning inlined",
                  "reasoning_dropped": "reasoning dropped", "turns_untrained": "turns left untrained"}
        table = Table(title=f"tool calls and reasoning (reasoning_turns={report['chat']['reasoning_turns']})",
                      title_justify="left", show_header=False)
        for key, value in chat.items():
            table.add_row(labels.get(key, key), f"{value:,}")
        out.print(table)

    if report["rejected_by_reason"]:
        rejected = Table(title="rejected rows (all of them: prepared/rejected.jsonl)", title_justify="left")
        rejected.add_column("reason")
        rejected.add_column("count", justify="right")
        for reason, count in report["rejected_by_reason"].items():
            rejected.add_row(reason, f"{count:,}")
        out.print(rejected)
        first = Table(title="first rejected", title_justify="left")
        for column in ("location", "reason", "detail"):
            first.add_column(column, overflow="fold")
        for row in report["first_rejected"]:
            first.add_row(row["location"], row["reason"], row["detail"])
        out.print(first)

    tokens = Table(title="tokens", title_justify="left", show_header=False)
    p = report["length_percentiles"]
    loss_share = report["train_loss_tokens"] / max(report["train_tokens"], 1)
    tokens.add_row("train tokens / loss tokens", f"{report['train_tokens']:,} / {report['train_loss_tokens']:,} "
                   f"({100 * loss_share:.1f}% trained)")
    tokens.add_row("eval tokens / loss tokens", f"{report['eval_tokens']:,} / {report['eval_loss_tokens']:,}")
    tokens.add_row("example length", f"p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}  "
                   f"(max_seq_len {report['max_seq_len']})")
    out.print(tokens)
    out.print(histogram(report["length_histogram"], "example length (tokens)"))


def histogram(buckets: list[dict], title: str, width: int = 40) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None)
    peak = max((b["count"] for b in buckets), default=1) or 1
    for b in buckets:
        bar = "█" * max(int(width * b["count"] / peak), 1 if b["count"] else 0)
        table.add_row(f"{b['from']:>6}-{b['to']:<6}", f"[cyan]{bar}[/]", f"{b['count']:,}")
    return table


# Trained text in green; inside it, reasoning and tool calls get their own colours (the template's
# own syntax tells them apart); tool results and schemas in the prompt are marked too.
REASONING_BLOCK = re.compile(r"<(think|thinking|thought)>.*?(</\1>|$)|<\|channel\|>analysis<\|message\|>.*?(<\|end\|>|$)"
                             r"|<\|channel>thought.*?(<channel\|>|$)", re.DOTALL)
TOOL_CALL_BLOCK = re.compile(r"<tool_call>.*?(</tool_call>|$)|<\|tool_call>.*?(<tool_call\|>|$)|<\|python_tag\|>"
                             r"|\[TOOL_CALLS\].*|<｜tool▁calls▁begin｜>.*?(<｜tool▁calls▁end｜>|$)|to=functions\.\S+.*?(<\|call\|>|$)"
                             r"|<\|tool_call_start\|>.*?(<\|tool_call_end\|>|$)", re.DOTALL)
TOOL_CONTEXT_BLOCK = re.compile(r"<tool_response>.*?</tool_response>|<tools>.*?</tools>|<\|tool_response>.*?<tool_response\|>"
                                r"|<｜tool▁output▁begin｜>.*?<｜tool▁output▁end｜>|<\|tool>.*?<tool\|>", re.DOTALL)
STYLES = {"trained": "bold black on green", "reasoning": "bold black on magenta", "tool_call": "bold black on cyan",
          "tool_context": "italic yellow", "prompt": "dim"}


def token_kinds(pieces: list[str], trained: list[bool]) -> list[str]:
    """A display kind per token: prompt / tool_context (results, schemas) / trained / reasoning / tool_call."""
    text, starts = "", []
    for piece in pieces:
        starts.append(len(text))
        text += piece
    marks = [""] * len(text)
    for kind, pattern in (("tool_context", TOOL_CONTEXT_BLOCK), ("reasoning", REASONING_BLOCK),
                          ("tool_call", TOOL_CALL_BLOCK)):
        for match in pattern.finditer(text):
            marks[match.start():match.end()] = [kind] * (match.end() - match.start())
    kinds = []
    for start, piece, is_trained in zip(starts, pieces, trained):
        mark = marks[start] if piece else ""
        if is_trained:
            kinds.append(mark if mark in ("reasoning", "tool_call") else "trained")
        else:
            kinds.append("tool_context" if mark == "tool_context" else "prompt")
    return kinds


def show_examples(dataset, tokenizer, n: int) -> None:
    """Each token of the first n examples: trained tokens highlighted (reasoning, tool calls apart),
    tool results and schemas marked, the rest dim."""
    for i in range(min(n, len(dataset))):
        row = dataset[i]
        pieces = [tokenizer.decode([token_id]) for token_id in row["input_ids"]]
        kinds = token_kinds(pieces, [label != -100 for label in row["labels"]])
        text = Text()
        for piece, kind in zip(pieces, kinds):
            text.append(piece.replace("\n", "⏎\n"), style=STYLES[kind])
        header = (f"example {i}  [{row['source']}  {row['location']}]  {row['num_tokens']} tokens, "
                  f"{row['num_loss_tokens']} trained (green; reasoning magenta, tool calls cyan; "
                  "tool results and schemas yellow)")
        out.rule(header)
        out.print(text)
    out.rule()


def print_pack_report(report: dict, folder: Path) -> None:
    table = Table(title=f"sft pack -> {folder}  (strategy {report['strategy']}, max_seq_len {report['max_seq_len']})",
                  title_justify="left")
    columns = ("split", "rows", "examples", "real tokens", "efficiency", "examples/row (mean, max)",
               "loss tokens", "split examples", "dropped")
    for column in columns:
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, s in report["splits"].items():
        table.add_row(name, f"{s['rows']:,}", f"{s['examples']:,}", f"{s['real_tokens']:,}",
                      f"{100 * s['efficiency']:.2f}%", f"{s['examples_per_row_mean']:.2f}, {s['examples_per_row_max']}",
                      f"{s['loss_tokens']:,}", f"{s['examples_split']:,}", f"{s['examples_dropped']:,}")
    out.print(table)


class _RichBar:
    """The slice of tqdm's interface that `datasets` uses, drawn as one line of a rich Progress.

    Installed by `datasets_progress()`: `datasets.map` keeps its multi-process progress
    accounting, and the user sees rich bars instead of tqdm's.
    """

    progress = None

    def __init__(self, *args, total=None, desc=None, initial=0, disable=False, **kwargs):
        self.n, self.desc = initial or 0, desc or ""
        self.task = None
        if not disable and self.progress is not None and "Saving" not in self.desc:
            self.task = self.progress.add_task(self.desc, total=total, completed=self.n)

    def update(self, n=1):
        self.n += n or 0
        if self.task is not None:
            self.progress.update(self.task, completed=self.n)

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or ""

    def refresh(self):
        pass

    def close(self):
        if self.task is not None:
            self.progress.update(self.task, visible=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def datasets_progress():
    """Context manager: `datasets.map` inside shows rich progress bars (saving stays quiet)."""
    import contextlib

    import datasets.arrow_dataset
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextlib.contextmanager
    def manager():
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=err, transient=False)
        saved = datasets.arrow_dataset.hf_tqdm
        _RichBar.progress = progress
        datasets.arrow_dataset.hf_tqdm = _RichBar
        try:
            with progress:
                yield progress
        finally:
            datasets.arrow_dataset.hf_tqdm = saved
            _RichBar.progress = None

    return manager()


def print_train_start(info: dict, plan, total_steps: int, cfg, packed: dict) -> None:
    """What one optimizer step is, before the first one: the effective global batch."""
    table = Table(title=f"sft train -> {cfg.run_dir}", title_justify="left", show_header=False)
    rows_per_step = plan.micro_batch_size * plan.micro_batches_per_step
    per_row = lambda key: packed[key] / max(packed["rows"], 1)  # noqa: E731
    table.add_row("model", f"{cfg.model.name_or_path}  ({info['dtype']}, attention {info['attn_implementation']})")
    table.add_row("parameters", f"{info['trainable_params']:,} trainable of {info['total_params']:,} "
                  f"({100 * info['trainable_params'] / max(info['total_params'], 1):.2f}%, peft {cfg.peft.method})")
    table.add_row("precision", f"compute {info['dtype']}; trained weights + AdamW {info['trainable_dtype']}"
                  + (f"; frozen {info['frozen_dtype']}" if info.get("frozen_dtype") else "")
                  + ("; float16 loss scaling" if info["dtype"] == "float16" else ""))
    table.add_row("processes", f"{plan.world_size} (parallel: {info.get('parallel', 'none')})"
                  + ("; weights read by rank 0, sent into each rank's shards" if info.get("parallel") == "fsdp" else ""))
    table.add_row("global batch", f"{rows_per_step} rows/step = {plan.micro_batch_size} micro x {plan.grad_accum} "
                  f"accum x {plan.world_size} proc; ~{rows_per_step * per_row('examples'):,.0f} examples, "
                  f"~{rows_per_step * per_row('real_tokens'):,.0f} tokens "
                  f"(~{rows_per_step * per_row('loss_tokens'):,.0f} trained) per step")
    table.add_row("schedule", f"{total_steps} steps, {plan.steps_per_epoch} per epoch over {packed['rows']:,} packed "
                  f"rows; lr {cfg.optim.lr:g} {cfg.optim.schedule}")
    out.print(table)


def counted_bar(unit: str):
    """A rich Progress: `unit N/M`, bar, a free `stats` field, elapsed and eta (on stderr)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(unit), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[stats]}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err)


def train_progress(total_steps: int, start_step: int, world):
    """Context manager yielding `update(step, record)`: a live bar with loss, lr and tokens/s (rank 0)."""
    import contextlib

    @contextlib.contextmanager
    def manager():
        if not world.is_main:
            yield lambda step, record: None
            return
        progress = counted_bar("step")
        task = progress.add_task("train", total=total_steps, completed=start_step, stats="")

        def update(step: int, record: dict) -> None:
            stats = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                     f"{record['tokens_per_sec']:,.0f} tok/s")
            progress.update(task, completed=step, stats=stats)

        with progress:
            yield update

    return manager()


def print_train_summary(lines: list[dict], run_dir: Path) -> None:
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if r.get("type") == "eval"]
    table = Table(title=f"trained: {run_dir}/final  (loss curve: {run_dir}/loss_curve.png)", title_justify="left")
    for column in ("step", "loss", "lr", "grad norm", "tokens/s", "eval loss"):
        table.add_column(column, justify="right")
    shown = steps if len(steps) <= 12 else steps[:: max(len(steps) // 10, 1)] + steps[-1:]
    eval_at = {r["step"]: r["eval_loss"] for r in evals}
    for r in shown:
        table.add_row(str(r["step"]), f"{r['loss']:.4f}", f"{r['lr']:.2e}", f"{r['grad_norm']:.3f}",
                      f"{r['tokens_per_sec']:,.0f}", f"{eval_at[r['step']]:.4f}" if r["step"] in eval_at else "")
    out.print(table)
    quarter = max(len(steps) // 4, 1)
    if len(steps) >= 4:
        # Per-step losses are noisy (each step is a few rows); the trend is what matters.
        first = sum(r["loss"] for r in steps[:quarter]) / quarter
        last = sum(r["loss"] for r in steps[-quarter:]) / quarter
        tokens = sum(r["tokens"] for r in steps)
        seconds = steps[-1]["elapsed_s"]
        out.print(f"train loss, mean of the first {quarter} steps -> last {quarter}: {first:.4f} -> {last:.4f}; "
                  f"{tokens:,} tokens in {seconds:,.0f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)")


def print_eval_report(report: dict, generations: list[dict], folder: Path) -> None:
    """Base vs tuned side by side, per-source losses, and a few sample replies."""
    from sft_cli.plot import COMPARED
    from sft_cli.plot import metric_value as value

    models = report["models"]
    table = Table(title=f"sft evaluate -> {folder}  ({report['target']})", title_justify="left")
    table.add_column("metric")
    for name in models:
        table.add_column(name, justify="right")

    for key, label, _ in COMPARED:
        table.add_row(label, *[f"{value(m, key):.4f}" if value(m, key) is not None else "" for m in models.values()])
    for source in models["tuned"]["by_source"]:
        table.add_row(f"loss ({escape(source)})", *[f"{m['by_source'].get(source, {}).get('loss', float('nan')):.4f}"
                                            for m in models.values()])
    out.print(table)
    out.print(f"evaluated on {report['device']} in {report['dtype']}")
    for row in [g for g in generations if g["mode"] == "greedy"][:4]:
        prompt = " ".join(row["prompt"].split())[-100:]
        out.print(f"[bold]{row['model']}[/] [dim]{escape(prompt)}[/]\n  -> "
                  f"{escape(row['reply'][:300])}{'' if row['stopped'] else ' [yellow](hit max_new_tokens)[/]'}")
    out.print(f"report: {folder / 'report.json'}  generations: {folder / 'generations.jsonl'}  "
              f"picture: {folder / 'comparison.png'}")


def print_generation_report(report: dict, folder: Path) -> None:
    """sft generate: per-source pass rates, what was kept, lengths and diversity, then where the files are."""
    n = report["n"]
    table = Table(title=f"sft generate -> {folder}  ({report['model']}, {report['engine']})", title_justify="left")
    for column in ("source (scorer)", "prompts", "pass@1", f"pass@{n}", "kept", "tokens all/kept", "distinct-2 all/kept",
                   "cut"):
        table.add_column(column, justify="left" if column.startswith("source") else "right")

    def rate(value) -> str:
        return f"{value:.1%}" if value is not None else "n/a"

    rows = list(report["by_source"].items()) + ([("all", report["overall"])] if len(report["by_source"]) > 1 else [])
    for name, s in rows:
        table.add_row(f"{escape(name)} ({s['scorer']})", f"{s['prompts']:,}", rate(s["pass@1"]), rate(s[f"pass@{n}"]),
                      f"{s['kept']:,} ({rate(s['acceptance'])})", f"{s['mean_tokens']:.0f}/{s['mean_tokens_kept']:.0f}",
                      f"{s['distinct_2']:.3f}/{s['distinct_2_kept']:.3f}", rate(s["truncated"]))
    out.print(table)
    why = ", ".join(f"{k} {v:,}" for k, v in report["overall"]["why"].items())
    speed = f"{report['tokens_per_s']:,.1f} tokens/s" if report["tokens_per_s"] else "no new tokens"
    out.print(f"{report['samples']:,} samples ({n} per prompt): {why}. {report['new_tokens']:,} tokens in "
              f"{report['generation_s']:,.1f} s ({speed}); cut = hit gen.max_new_tokens"
              + (f"; {report['rejected_rows']:,} prompt rows not usable (rejected.jsonl)" if report["rejected_rows"] else ""))
    if report.get("warning"):
        out.print(f"[yellow]warning:[/] {report['warning']}")
    out.print(f"training data: {folder / 'data.jsonl'}  every sample: {folder / 'all.jsonl'}  "
              f"report: {folder / 'report.json'}  picture: {folder / 'generation.png'}")


def print_sweep_summary(rows: list[dict], root: Path) -> None:
    table = Table(title=f"sweep -> {root}/sweep.json, sweep.csv, sweep_losses.png", title_justify="left")
    for column in ("point", "status", "final loss", "best eval", "tokens/s", "wall s"):
        table.add_column(column, justify="left" if column in ("point", "status") else "right")

    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else ""

    ordered = sorted(rows, key=lambda r: (r["best_eval_loss"] is None, r["best_eval_loss"] or 0.0))
    for r in ordered:
        status = "ok" if r["status"] == "ok" else f"[red]failed[/] {escape(r['error'][:60])}"
        table.add_row(escape(Path(r["run_dir"]).name or r["overrides"]), status, fmt(r["final_train_loss"], ".4f"),
                      fmt(r["best_eval_loss"], ".4f"), fmt(r["tokens_per_sec"], ",.0f"), fmt(r["wall_s"], ".1f"))
    out.print(table)


def print_merge_summary(folder: Path, check: dict, parameters: int, shards: list[str]) -> None:
    table = Table(title=f"sft merge-lora -> {folder}", title_justify="left", show_header=False)
    table.add_row("parameters", f"{parameters:,} ({check['dtype']})")
    table.add_row("files", ", ".join(shards))
    table.add_row("verified", f"max |merged - (base + adapter)| = {check['max_abs_diff']:.3g} on {check['inputs']} "
                  f"inputs (tolerance {check['tolerance']:.3g}, logit scale {check['logit_scale']:.3g})")
    table.add_row("load with", f"AutoModelForCausalLM.from_pretrained('{folder}')")
    out.print(table)
