"""The pictures, read from their Figure objects (not pixels): labels, tick values, titles, legends, and
data equal to what metrics.jsonl and report.json hold; a PNG and an SVG beside each."""

import math

import numpy as np
import pytest

from sft_cli.plot import COMPARED, comparison, ema, generation, loss_curve, metric_value, sweep_curves


def _lines(steps: int = 12, eval_every: int = 4, lr: float = 1e-3, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": 3.0 - 0.1 * step + float(rng.normal(0, 0.3)), "lr": lr * min(1, step / 2),
                      "tokens": 1000 + step, "grad_norm": 1.0})
        if step % eval_every == 0:
            lines.append({"type": "eval", "step": step, "eval_loss": 3.0 - 0.08 * step})
    return lines


def _legend(ax_or_fig) -> list[str]:
    legend = ax_or_fig.get_legend() if hasattr(ax_or_fig, "get_legend") else ax_or_fig.legends[0]
    return [t.get_text() for t in legend.get_texts()]


def test_ema_is_debiased_and_smooths():
    assert ema([2.0]) == [2.0]
    assert ema([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    noisy = [1.0, 3.0] * 20
    smooth = ema(noisy)
    assert np.std(smooth[10:]) < np.std(noisy[10:]) / 3


def test_loss_curve_draws_metrics_values_with_labels_ticks_title_and_legend(tmp_path):
    lines = _lines()
    fig = loss_curve(lines, tmp_path / "loss_curve.png", "demo: tiny (lora r=16)\nlr 0.001")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "optimizer step" and "loss" in ax.get_ylabel()
    assert ax.get_title().startswith("demo: tiny")
    assert [t.get_text() for t in ax.get_yticklabels() if t.get_text()]  # tick values drawn
    legend = _legend(fig)
    assert legend[0] == "train loss (per step)" and "EMA" in legend[1] and "eval loss" in legend and \
        "learning rate" in legend
    train = [r for r in lines if "loss" in r]
    raw, smooth, evals = ax.get_lines()[:3]
    assert list(raw.get_ydata()) == [r["loss"] for r in train]
    assert list(smooth.get_ydata()) == pytest.approx(ema([r["loss"] for r in train]))
    assert list(evals.get_xdata()) == [4, 8, 12] and list(evals.get_ydata()) == [r["eval_loss"] for r in lines
                                                                                 if r.get("type") == "eval"]
    lr_axis = [a for a in fig.axes if a.get_ylabel() == "learning rate"]
    assert lr_axis and list(lr_axis[0].get_lines()[0].get_ydata()) == [r["lr"] for r in train]
    assert any(getattr(a, "get_xlabel", lambda: "")() == "tokens seen" for a in fig.axes + ax.child_axes)
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "loss_curve.svg").read_bytes()[:500]
    assert not list(tmp_path.glob(".*tmp*"))  # written whole, temp files gone


def test_loss_curve_skips_non_finite_losses(tmp_path):
    lines = _lines(steps=4, eval_every=10)
    lines[1]["loss"] = math.nan
    fig = loss_curve(lines, tmp_path / "c.png", "t")
    assert len(fig.axes[0].get_lines()[0].get_ydata()) == 3


REPORT = {
    "target": "runs/x/final",
    "models": {
        "base": {"loss": 3.1, "ppl": 22.2, "token_accuracy": 0.31, "forgetting_ppl": 25.0,
                 "generation": {"distinct_1": 0.4, "distinct_2": 0.7, "mean_reply_tokens": 40.0, "stopped_on_own": 0.5},
                 "by_source": {"chat": {"loss": 3.0}, "text": {"loss": 3.3}}},
        "tuned": {"loss": 2.8, "ppl": 16.4, "token_accuracy": 0.45, "forgetting_ppl": 26.0,
                  "generation": {"distinct_1": 0.35, "distinct_2": 0.6, "mean_reply_tokens": 30.0,
                                 "stopped_on_own": 0.75},
                  "by_source": {"chat": {"loss": 2.5}, "text": {"loss": 3.2}}}},
    "comparison": {"eval_loss_delta": -0.3},
}


def test_comparison_has_one_labelled_panel_per_metric_with_report_values(tmp_path):
    fig = comparison(REPORT, tmp_path / "comparison.png")
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}
    for key, label, better in COMPARED:
        ax = panels[label]
        assert (f"({better} is better)" if better else "(no better direction)") in ax.get_title()
        heights = [bar.get_height() for bar in ax.patches]
        expected = [metric_value(REPORT["models"][m], key) for m in ("base", "tuned")]
        assert heights == pytest.approx(expected)
        written = [t.get_text() for t in ax.texts]
        assert written == [f"{v:.4g}" for v in expected]  # the values, on the bars
        assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "tuned"]
    sources = panels["eval loss per source"]
    assert [t.get_text() for t in sources.get_xticklabels()] == ["chat", "text"]
    assert [b.get_height() for b in sources.patches] == [3.0, 3.3, 2.5, 3.2]  # base bars, then tuned
    assert _legend(fig) == ["base model", "tuned model"]
    assert "base vs tuned" in fig._suptitle.get_text()
    assert (tmp_path / "comparison.svg").exists()


def test_comparison_without_a_base_model(tmp_path):
    report = {"target": "x", "models": {"tuned": REPORT["models"]["tuned"]}}
    fig = comparison(report, tmp_path / "c.png")
    assert _legend(fig) == ["tuned model"]
    assert all(len(ax.patches) in (0, 1, 2) for ax in fig.axes)


def test_sweep_curves_label_points_and_plot_final_eval_against_each_value(tmp_path):
    points = [{"overrides": {"optim.lr": lr, "seed": seed}, "lines": _lines(lr=float(lr), seed=int(seed))}
              for lr in ("0.0001", "0.001") for seed in ("0", "1")]
    for i, point in enumerate(points):  # distinct final eval losses
        point["lines"][-1]["eval_loss"] = 2.0 + i
    fig = sweep_curves(points, tmp_path / "sweep_losses.png")
    curves, by_lr, by_seed = fig.axes[:3]
    assert _legend(curves) == [f"optim.lr={lr} seed={s}" for lr in ("0.0001", "0.001") for s in ("0", "1")]
    smooth = curves.get_lines()[0]
    assert list(smooth.get_ydata()) == pytest.approx(ema([r["loss"] for r in points[0]["lines"] if "loss" in r]))
    assert by_lr.get_xlabel() == "optim.lr" and by_lr.get_ylabel() == "final eval loss"
    assert by_lr.get_xscale() == "log"  # a decade apart
    x, y = by_lr.get_lines()[0].get_data()
    assert list(x) == [1e-4, 1e-4, 1e-3, 1e-3] and list(y) == [2.0, 3.0, 4.0, 5.0]
    assert by_seed.get_xlabel() == "seed"
    assert (tmp_path / "sweep_losses.svg").exists()


def test_generation_draws_pass_rates_per_source_and_diversity_all_vs_kept(tmp_path):
    def stats(p1, pn, acc, d1, d2, k1, k2):
        return {"pass@1": p1, "pass@4": pn, "acceptance": acc, "distinct_1": d1, "distinct_2": d2,
                "distinct_1_kept": k1, "distinct_2_kept": k2}

    report = {"n": 4, "prompts": 20, "kept": 7, "model": "m",
              "by_source": {"mmlu": stats(0.25, 0.5, 0.1, 0.3, 0.6, 0.7, 0.9),
                            "chat": stats(None, None, 1.0, 0.4, 0.5, 0.4, 0.5)},
              "overall": stats(0.2, 0.4, 0.3, 0.31, 0.62, 0.77, 0.95)}
    fig = generation(report, tmp_path / "generation.png")
    rates, diversity = fig.axes
    assert [t.get_text() for t in rates.get_xticklabels()] == ["mmlu", "chat"]
    heights = {c.get_label(): [round(b.get_height(), 3) for b in c] for c in rates.containers}
    assert heights == {"pass@1": [0.25, 0.0], "pass@4": [0.5, 0.0], "kept / samples": [0.1, 1.0]}
    labels = [t.get_text() for t in rates.texts]  # bar labels: an unscored source says n/a, not 0
    assert labels.count("n/a") == 2
    kept = {c.get_label(): [round(b.get_height(), 3) for b in c] for c in diversity.containers}
    assert kept == {"all samples": [0.31, 0.62], "kept": [0.77, 0.95]}
    assert (tmp_path / "generation.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "generation.svg").exists()
