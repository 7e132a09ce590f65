"""Sweeps: `sft train -m recipe=demo optim.lr=1e-4,3e-4 seed=0,1` (Hydra multirun, one point after
another). Each point trains in its own run_dir, named from the swept values under the recipe's
run_dir (`runs/demo/optim.lr=0.0001,seed=0`: readable, stable, no timestamps), and at the end
`SweepSummary` (a Hydra callback) writes, next to the points:

    sweep.json / sweep.csv    each point: overrides, status (ok / failed + error line), final train
                              loss, best eval loss, tokens/s, wall time, run_dir
    sweep_losses.png          every point's train-loss curve, overlaid
and prints the points as a table sorted by eval loss. A failed point is recorded and the sweep
goes on; re-running the sweep skips finished points and resumes unfinished ones.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from hydra.experimental.callback import Callback


def swept_keys(overrides: list[str]) -> list[str]:
    """Keys whose command-line value lists several points (a,b / glob(...) / range(...)), read with
    Hydra's own grammar: a quoted path with commas in it or a list of sources is one value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    keys = []
    for arg in overrides:
        if "=" not in arg or arg.startswith(("hydra.", "-")):
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # the command line was checked before any job ran; nothing to name a point by
        if override.is_sweep_override():
            keys.append(override.key_or_group)
    return keys


def point_name(job_overrides: list[str], keys: list[str]) -> str:
    """`optim.lr=0.0001,seed=0` from this job's values of the swept keys (in command-line order).

    The name is one folder inside the sweep's run_dir whatever the values hold: path separators
    and control characters (NUL, newlines) become `-`, spaces go, and `.`/`..` cannot result."""
    values = dict(arg.lstrip("+").split("=", 1) for arg in job_overrides if "=" in arg)
    parts = [f"{key}={values[key]}" for key in keys if key in values]
    name = "".join("-" if ch == "/" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in ",".join(parts))
    name = name.replace(" ", "")
    return name if name.strip(".") else "point"


class SweepSummary(Callback):
    """Collects every job's outcome (the task returns a dict) and summarises the sweep at its end."""

    def __init__(self) -> None:
        self.points: list[dict] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        outcome = job_return.return_value if isinstance(job_return.return_value, dict) else {}
        overrides = list(job_return.overrides or [])
        self.points.append({"overrides": overrides, **outcome})

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.points:
            return
        rows = [summarise_point(p) for p in self.points]
        dirs = [Path(r["run_dir"]).resolve() for r in rows if r.get("run_dir")]
        if not dirs:
            return
        root = Path(os.path.commonpath([str(d.parent) for d in dirs]))
        write_summary(root, rows)


def summarise_point(point: dict) -> dict:
    run_dir = Path(point.get("run_dir", ""))
    lines = []
    metrics = run_dir / "metrics.jsonl"
    if point.get("run_dir") and metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    steps = [r for r in lines if "loss" in r]
    evals = [r["eval_loss"] for r in lines if r.get("type") == "eval"]
    tokens = sum(r["tokens"] for r in steps)
    wall = steps[-1]["elapsed_s"] if steps else None
    return {"overrides": " ".join(point.get("overrides", [])), "status": "ok" if point.get("exit_code") == 0 else
            "failed", "error": point.get("error", ""), "final_train_loss": steps[-1]["loss"] if steps else None,
            "best_eval_loss": min(evals) if evals else None,
            "tokens_per_sec": tokens / wall if wall else None, "wall_s": wall, "steps": len(steps),
            "run_dir": str(run_dir) if point.get("run_dir") else "",
            "curve": [(r["step"], r["loss"]) for r in steps if math.isfinite(r["loss"])]}


def write_summary(root: Path, rows: list[dict]) -> None:
    from sft_cli import console as ui
    from sft_cli.artifacts import write_json_atomic, write_text_atomic
    from sft_cli.plot import curves_png

    table_rows = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    write_json_atomic(root / "sweep.json", {"points": table_rows})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table_rows[0]))
    writer.writeheader()
    writer.writerows(table_rows)
    write_text_atomic(root / "sweep.csv", buffer.getvalue())
    curves_png([r["curve"] for r in rows], root / "sweep_losses.png")
    ui.print_sweep_summary(table_rows, root)
