"""Experiment trackers people already use, each through its own library, on rank 0 only:

    tensorboard   run_dir/tensorboard/ event files (also on by default when the package is installed)
    wandb         Weights & Biases: online when logged in (WANDB_API_KEY or ~/.netrc), else offline
                  into run_dir/wandb/ (`wandb sync` uploads it later); WANDB_MODE / WANDB_PROJECT win
    mlflow        MLFLOW_TRACKING_URI when set, else a local file store in run_dir/mlruns/

Each gets the resolved config, every metrics.jsonl line, the eval report and the pictures. The run
ids are kept in run_dir/trackers.json, so a resumed `sft train` and a later `sft evaluate` log into
the same tracker run.

    with Trackers.open(cfg, run_dir) as trackers:
        trackers.log_config(config_dict)
        trackers.log_metrics({"step": 1, "loss": 2.3})
        trackers.log_report(report)
        trackers.log_image(run_dir / "loss_curve.png")
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from sft_cli.config import SFTConfig
from sft_cli.run_dir import write_json_atomic

IDS_FILE = "trackers.json"


def chosen(cfg: SFTConfig) -> list[str]:
    """trainer.report_to, or TensorBoard alone when the list is empty and it is installed."""
    if cfg.trainer.report_to:
        return list(dict.fromkeys(cfg.trainer.report_to))
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def flatten(node, prefix: str = "") -> dict:
    """A nested config dict as {"optim.lr": 0.001, ...}; lists as JSON text (one tracker param each)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """Every finite number of a (nested) record, by dotted key: what a tracker can chart."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= numbers(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_report(self, report: dict, values: dict[str, float]) -> None:
        self.log_metrics(values, 0)
        self.writer.add_text("eval/report", "```\n" + json.dumps(report, indent=2, default=str) + "\n```")

    def log_image(self, path: Path) -> None:
        from matplotlib.image import imread

        self.writer.add_image(f"plots/{path.stem}", imread(str(path))[..., :3], dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, ids: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_credentials() else "offline")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sft"), name=run_dir.name, dir=str(run_dir),
                              id=ids.get("wandb"), resume="allow", mode=mode)
        ids["wandb"] = self.run.id

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_report(self, report: dict, values: dict[str, float]) -> None:
        self.run.summary.update(values)
        self.run.save(str(_report_file(self.run.dir, report)), base_path=self.run.dir, policy="now")

    def log_image(self, path: Path) -> None:
        self.run.log({f"plots/{path.stem}": self.wandb.Image(str(path))}, commit=False)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, ids: dict):
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps the file store in maintenance mode behind this switch; a local folder
            # next to the run is still the store that needs no server and no network.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "sft"))
        self.run = mlflow.start_run(run_id=ids.get("mlflow"), run_name=run_dir.name,
                                    experiment_id=experiment.experiment_id)
        ids["mlflow"] = self.run.info.run_id

    def log_config(self, config: dict) -> None:
        params = {key: str(value)[:500] for key, value in flatten(config).items()}
        existing = self.mlflow.get_run(self.run.info.run_id).data.params
        self.mlflow.log_params({k: v for k, v in params.items() if k not in existing})  # params are write-once
        self.mlflow.log_dict(config, "config.json")

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({key.replace("/", "."): value for key, value in values.items()}, step=step)

    def log_report(self, report: dict, values: dict[str, float]) -> None:
        self.log_metrics(values, 0)
        self.mlflow.log_dict(report, "eval/report.json")

    def log_image(self, path: Path) -> None:
        self.mlflow.log_artifact(str(path), artifact_path="plots")

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The chosen trackers of one run, opened together; with none chosen (or off rank 0) every call
    is a no-op."""

    def __init__(self, run_dir: Path, names: list[str]):
        self.run_dir, self.names, self.backends = Path(run_dir), names, []

    @classmethod
    def open(cls, cfg: SFTConfig, run_dir: Path, enabled: bool = True) -> Trackers:
        return cls(run_dir, chosen(cfg) if enabled else [])

    def __enter__(self) -> Trackers:
        if self.names:
            ids_path = self.run_dir / IDS_FILE
            ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
            self.backends = [BACKENDS[name](self.run_dir, ids) for name in self.names]
            write_json_atomic(ids_path, ids)
        return self

    def log_config(self, config: dict) -> None:
        for backend in self.backends:
            backend.log_config(config)

    def log_metrics(self, record: dict) -> None:
        """One metrics.jsonl line: train lines under train/, eval lines under eval/."""
        prefix = "eval/" if record.get("type") == "eval" else "train/"
        values = {f"{prefix}{key}": value for key, value in numbers(record).items() if key != "step"}
        for backend in self.backends:
            backend.log_metrics(values, int(record["step"]))

    def log_report(self, report: dict) -> None:
        """sft evaluate's report.json: its numbers as eval_report/<model>/<metric>, and the file itself."""
        values = numbers(report.get("models", {}), "eval_report/") | numbers(report.get("comparison", {}),
                                                                          "eval_report/comparison/")
        for backend in self.backends:
            backend.log_report(report, values)

    def log_image(self, path: Path) -> None:
        for backend in self.backends:
            backend.log_image(Path(path))

    def __exit__(self, *exc) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def _wandb_credentials() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


def _report_file(folder: str, report: dict) -> Path:
    path = Path(folder) / "eval_report.json"
    write_json_atomic(path, report)
    return path
