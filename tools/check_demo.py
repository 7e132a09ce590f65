"""`make demo`'s last word on training: the demo's smoothed train loss must end below where it starts.

    python tools/check_demo.py runs/demo

Reads run_dir/metrics.jsonl, smooths the per-step losses as loss_curve.png does (plot.ema), prints the
first and last smoothed values and exits 1 if the curve did not fall: a demo that learns nothing is broken.
"""

import json
import sys
from pathlib import Path

from sft_cli.plot import SMOOTHING, ema


def main(run_dir: str) -> int:
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in lines if "loss" in r]
    smooth = ema([r["loss"] for r in steps])
    evals = [r["eval_loss"] for r in lines if r.get("type") == "eval"]
    falls = len(smooth) >= 2 and smooth[-1] < smooth[0]
    print(f"demo train loss, EMA (weight {SMOOTHING}): {smooth[0]:.3f} at step {steps[0]['step']} -> "
          f"{smooth[-1]:.3f} at step {steps[-1]['step']}" + (f"; eval loss {evals[0]:.3f} -> {evals[-1]:.3f}"
                                                             if evals else "") + ("" if falls else "  NOT FALLING"))
    return 0 if falls else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
