"""Rich output shared by the verbs: summary tables, histograms, token-level views.

Results go to stdout (`out`), progress and diagnostics to stderr (`err`), so
`sft prepare ... > report.txt` keeps the tables and drops the chatter.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)


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


def show_examples(dataset, tokenizer, n: int) -> None:
    """Each token of the first n examples; trained tokens highlighted, the rest dim."""
    for i in range(min(n, len(dataset))):
        row = dataset[i]
        text = Text()
        for token_id, label in zip(row["input_ids"], row["labels"]):
            piece = tokenizer.decode([token_id]).replace("\n", "⏎\n")
            text.append(piece, style="bold black on green" if label != -100 else "dim")
        header = (f"example {i}  [{row['source']}  {row['location']}]  {row['num_tokens']} tokens, "
                  f"{row['num_loss_tokens']} trained (green)")
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
