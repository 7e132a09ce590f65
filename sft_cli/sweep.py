"""Sweeps: `sft train -m recipe=demo optim.lr=1e-4,3e-4 seed=0,1` (Hydra multirun, one point after
another). Each point trains in its own run_dir, named from the swept values under the recipe's
run_dir (`runs/demo/optim.lr=0.0001,seed=0`: readable, stable, no timestamps), and at the end
`summarise(points)` writes, next to the points:

    sweep.json / sweep.csv    each point: overrides, status (ok / failed + error line), final train
                              loss, best eval loss, tokens/s, wall time, run_dir
    sweep_losses.png (+ .svg) every point's smoothed train-loss curve with its eval losses, and the
                              final eval loss against each swept value
and prints the points as a table sorted by eval loss. A failed point is recorded and the sweep
goes on; re-running the sweep skips finished points and resumes unfinished ones.

Plain data in, files out: cli.py reads the command line with Hydra (which keys are swept, each
point's overrides) and hands this module lists of strings and the points' outcomes.

    point_run_dir("runs/demo", ["optim.lr"], ["optim.lr=0.0001"], ["optim.lr=1e-4,3e-4"])
    # -> 'runs/demo/optim.lr=0.0001'
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


def point_run_dir(run_dir: str, keys: list[str], job_overrides: list[str], user_overrides: list[str]) -> str:
    """A sweep point's run_dir: `run_dir/<point_name>`, unless the user names the points' run_dirs
    themselves (run_dir is one of the swept `keys`, or its value is an interpolation)."""
    user_run_dir = [arg for arg in user_overrides if arg.startswith("run_dir=")]
    if "run_dir" in keys or any("${" in arg for arg in user_run_dir):
        return run_dir
    return f"{run_dir}/{point_name(job_overrides, keys)}"


def point_name(job_overrides: list[str], keys: list[str]) -> str:
    """`optim.lr=0.0001,seed=0` from this job's values of the swept keys (in command-line order).

    The name is one folder inside the sweep's run_dir whatever the values hold: path separators
    and control characters (NUL, newlines) become `-`, spaces go, and `.`/`..` cannot result."""
    values = dict(arg.lstrip("+").split("=", 1) for arg in job_overrides if "=" in arg)
    parts = [f"{key}={values[key]}" for key in keys if key in values]
    name = "".join("-" if ch == "/" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in ",".join(parts))
    name = name.replace(" ", "")
    return name if name.strip(".") else "point"


def summarise(points: list[dict]) -> None:
    """Write the sweep's summary beside its points (their run_dirs' common parent). `points`: one
    dict per point, in the order they ran: {overrides: [...], swept: {key: value}, run_dir, exit_code,
    error}."""
    rows = [summarise_point(p) for p in points]
    dirs = [Path(r["run_dir"]).resolve() for r in rows if r.get("run_dir")]
    if not dirs:
        return
    root = Path(os.path.commonpath([str(d.parent) for d in dirs]))
    write_summary(root, rows)


def summarise_point(point: dict) -> dict:
    run_dir = Path(point.get("run_dir") or "")
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
            "swept": point.get("swept", {}), "lines": lines}


def write_summary(root: Path, rows: list[dict]) -> None:
    from sft_cli import console as ui
    from sft_cli.plot import sweep_curves
    from sft_cli.run_dir import write_json_atomic, write_text_atomic

    table_rows = [{k: v for k, v in r.items() if k not in ("swept", "lines")} for r in rows]
    write_json_atomic(root / "sweep.json", {"points": table_rows})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table_rows[0]))
    writer.writeheader()
    writer.writerows(table_rows)
    write_text_atomic(root / "sweep.csv", buffer.getvalue())
    sweep_curves([{"overrides": r["swept"], "lines": r["lines"]} for r in rows], root / "sweep_losses.png")
    ui.print_sweep_summary(table_rows, root)
