"""The pictures a run leaves, drawn with matplotlib (Agg: no display needed), each as a PNG and an
SVG beside it (crisp in browsers and docs), written atomically:

    loss_curve(lines, run_dir / "loss_curve.png", title)      # train loss, its EMA, eval loss, lr
    comparison(report, run_dir / "eval" / "comparison.png")   # sft evaluate: base vs tuned per metric
    sweep_curves(points, root / "sweep_losses.png")           # every sweep point, and eval loss per value
    generation(report, run_dir / "generated" / "generation.png")  # sft generate: pass rates, diversity

Each returns its Figure, so tests read what was drawn (labels, ticks, legend, data) rather than pixels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: never a display, also under a desktop session

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Debiased EMA (TensorBoard's smoothing): a per-step loss jumps with each step's few rows.
SMOOTHING = 0.8
TRAIN, SMOOTH, EVAL, LR, BASE, TUNED = "#9ecae1", "#1f77b4", "#ff7f0e", "#7f7f7f", "#bdbdbd", "#1f77b4"

# sft evaluate's metrics, in the picture's (and console table's) order: (key, label, better).
COMPARED = (("loss", "eval loss", "lower"), ("ppl", "eval perplexity", "lower"),
            ("token_accuracy", "token accuracy", "higher"), ("forgetting_ppl", "general-text perplexity", "lower"),
            ("distinct_1", "distinct-1", "higher"), ("distinct_2", "distinct-2", "higher"),
            ("mean_reply_tokens", "reply length (tokens)", None), ("stopped_on_own", "stops on its own", "higher"))


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with the zero-start bias removed (so the first value is itself)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def metric_value(model: dict, key: str) -> float | None:
    """A metric of report.json's models[name]: top level or under "generation"."""
    value = model.get(key, model.get("generation", {}).get(key))
    return None if value is None else float(value)


def loss_curve(lines: list[dict], path: Path, title: str) -> Figure:
    """metrics.jsonl's lines -> train loss per step (light) and its EMA, eval loss as markers, the
    learning rate on a second y axis, tokens seen on a second x axis."""
    steps = [r for r in lines if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in lines if r.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    x, y = [r["step"] for r in steps], [r["loss"] for r in steps]
    ax.plot(x, y, color=TRAIN, linewidth=1, label="train loss (per step)")
    ax.plot(x, ema(y), color=SMOOTH, linewidth=2.2, label=f"train loss, EMA (weight {SMOOTHING}, debiased)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", color=EVAL, markersize=7,
                label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean CE per trained token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if steps and "lr" in steps[0]:
        lr_ax = ax.twinx()
        lr_ax.plot(x, [r["lr"] for r in steps], color=LR, linestyle="--", linewidth=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        more = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if len(steps) >= 2:
        _tokens_axis(ax, x, [r.get("tokens", 0) for r in steps])
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
    ax.set_title(title, fontsize=10)
    save(fig, path)
    return fig


def _tokens_axis(ax, steps: list[int], tokens_per_step: list[int]) -> None:
    """A top x axis in tokens seen, interpolated from the steps' cumulative token counts."""
    import numpy as np

    seen = np.cumsum(tokens_per_step, dtype=np.float64)
    if not np.all(np.diff(seen) > 0):
        return  # a step without tokens: no one-to-one map between the axes
    xs = np.asarray(steps, dtype=np.float64)
    top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, xs, seen), lambda t: np.interp(t, seen, xs)))
    top.set_xlabel("tokens seen")


def comparison(report: dict, path: Path) -> Figure:
    """sft evaluate's report -> one panel per metric (base vs tuned bars, values written on them, which
    direction is better in the panel's title), then one panel of the per-source eval losses."""
    models = {name: report["models"][name] for name in ("base", "tuned") if name in report["models"]}
    metrics = [m for m in COMPARED if any(metric_value(model, m[0]) is not None for model in models.values())]
    sources = sorted({s for model in models.values() for s in model.get("by_source", {})})
    panels = len(metrics) + (1 if sources else 0)
    columns = 4
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.0 * rows), layout="constrained", squeeze=False)
    colors = {"base": BASE, "tuned": TUNED}
    for ax, (key, label, better) in zip(axes.flat, metrics):
        names = [n for n in models if metric_value(models[n], key) is not None]
        values = [metric_value(models[n], key) for n in names]
        bars = ax.bar(names, values, color=[colors[n] for n in names], label=names)
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], padding=2, fontsize=9)
        ax.set_title(f"{label}\n({better} is better)" if better else f"{label}\n(no better direction)", fontsize=10)
        ax.set_ylabel(label, fontsize=8)
        ax.margins(y=0.18)
    if sources:
        ax = axes.flat[len(metrics)]
        width = 0.8 / len(models)
        for i, name in enumerate(models):
            values = [models[name].get("by_source", {}).get(s, {}).get("loss", float("nan")) for s in sources]
            bars = ax.bar([j + i * width for j in range(len(sources))], values, width, color=colors[name], label=name)
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=2, fontsize=8)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(sources))], sources, rotation=20,
                      fontsize=8)
        ax.set_title("eval loss per source\n(lower is better)", fontsize=10)
        ax.set_ylabel("eval loss", fontsize=8)
        ax.margins(y=0.18)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in models]
    fig.legend(handles, [f"{n} model" for n in models], loc="outside lower center", ncols=len(models))
    fig.suptitle(f"sft evaluate: base vs tuned ({report.get('target', '')})", fontsize=11)
    save(fig, path)
    return fig


def generation(report: dict, path: Path) -> Figure:
    """sft generate's report -> left: pass@1, pass@N and acceptance per source (what the scorer let
    through); right: distinct-1/2 of all samples vs the kept ones (does selection narrow the data?)."""
    sources = list(report["by_source"])
    n = report["n"]
    fig, (rates, diversity) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    metrics = [("pass@1", "pass@1", "#9ecae1"), (f"pass@{n}", f"pass@{n}", "#1f77b4"),
               ("acceptance", "kept / samples", "#ff7f0e")]
    width = 0.8 / len(metrics)
    for i, (key, label, color) in enumerate(metrics):
        values = [report["by_source"][s][key] for s in sources]
        shown = [v if v is not None else 0.0 for v in values]
        bars = rates.bar([j + i * width for j in range(len(sources))], shown, width, color=color, label=label)
        rates.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "n/a" for v in values], padding=2, fontsize=8)
    rates.set_xticks([j + width for j in range(len(sources))], sources, fontsize=9)
    rates.set_ylim(0, 1.3)
    rates.set_ylabel("fraction")
    rates.set_title("verified replies per source (higher is better)", fontsize=10)
    rates.legend(fontsize=8, loc="upper right")
    groups = [("distinct_1", "distinct-1"), ("distinct_2", "distinct-2")]
    for i, (which, color, suffix) in enumerate((("all samples", BASE, ""), ("kept", TUNED, "_kept"))):
        values = [report["overall"][key + suffix] for key, _ in groups]
        bars = diversity.bar([j + i * 0.4 for j in range(len(groups))], values, 0.4, color=color, label=which)
        diversity.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=8)
    diversity.set_xticks([j + 0.2 for j in range(len(groups))], [label for _, label in groups])
    diversity.set_ylim(0, 1.3)  # room for the legend above the bars
    diversity.set_title("diversity: unique n-grams / all (higher is more varied)", fontsize=10)
    diversity.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"sft generate: {report['prompts']} prompts x {n} samples, {report['kept']} kept "
                 f"({report['model']})", fontsize=11)
    save(fig, path)
    return fig


def sweep_curves(points: list[dict], path: Path) -> Figure:
    """A sweep's points ({"overrides": {key: value}, "lines": metrics lines}) -> left: every point's
    smoothed train loss and its eval markers, labelled by its overrides; then one panel per swept
    key: final eval loss against the key's value (the plot people draw by hand after a sweep)."""
    keys = sorted({k for p in points for k in p["overrides"]})
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(7 + 4 * len(keys), 5), layout="constrained", squeeze=False)
    curves = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, point in enumerate(points):
        color = colors[i % len(colors)]
        label = " ".join(f"{k}={v}" for k, v in point["overrides"].items()) or "(defaults)"
        steps = [r for r in point["lines"] if "loss" in r and math.isfinite(r["loss"])]
        if steps:
            curves.plot([r["step"] for r in steps], ema([r["loss"] for r in steps]), color=color, label=label)
        evals = [r for r in point["lines"] if r.get("type") == "eval"]
        if evals:
            curves.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", color=color)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel(f"train loss, EMA (weight {SMOOTHING}); dots: eval loss")
    curves.set_title("every point's loss curve", fontsize=10)
    curves.grid(alpha=0.3)
    if points:
        curves.legend(fontsize=8)
    for ax, key in zip(axes[0][1:], keys):
        _final_eval_against(ax, points, key)
    fig.suptitle(f"sweep: {len(points)} points", fontsize=11)
    save(fig, path)
    return fig


def _final_eval_against(ax, points: list[dict], key: str) -> None:
    """Final eval loss of each point against its value of `key`; numbers on a number line (log-scale
    when they span a decade, as learning rates do), anything else as categories."""
    finals = []
    for point in points:
        evals = [r["eval_loss"] for r in point["lines"] if r.get("type") == "eval"]
        if key in point["overrides"] and evals:
            finals.append((point["overrides"][key], evals[-1]))
    numeric = all(_number(v) is not None for v, _ in finals)
    xs = [_number(v) if numeric else str(v) for v, _ in finals]
    ax.plot(xs, [loss for _, loss in finals], "o", color=SMOOTH, markersize=7)
    if numeric and finals and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("final eval loss")
    ax.set_title(f"final eval loss vs {key}", fontsize=10)
    ax.grid(alpha=0.3)


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def save(fig: Figure, path: Path) -> None:
    """path (.png) and the same figure as .svg beside it, each written whole or not at all; the figure
    is closed for pyplot (no leak across a sweep) but stays readable by the caller."""
    path = Path(path)
    for target in (path, path.with_suffix(".svg")):
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        fig.savefig(tmp, format=target.suffix[1:], dpi=110)
        os.replace(tmp, target)
    plt.close(fig)
