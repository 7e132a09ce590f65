"""Where training metrics go: `run_dir/metrics.jsonl` (one JSON line per optimizer step, eval
lines marked `"type": "eval"`) and, when the tensorboard package is installed, TensorBoard
event files in `run_dir/tensorboard/`. Rank 0 writes; other ranks get a log that drops lines.

    with MetricsLog(run_dir, enabled=world().is_main) as log:
        log.write({"step": 1, "loss": 2.3, ...})
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._file = None
        self._tensorboard = None

    def __enter__(self) -> MetricsLog:
        if self.enabled:
            self._file = open(self.path, "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:  # optional: tensorboard is not a dependency
                pass
        return self

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        if self._tensorboard is not None:
            prefix = "eval" if record.get("type") == "eval" else "train"
            for key, value in record.items():
                if key not in ("step", "type") and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
