"""trainer.report_to: each tracker, through its own library, receives the resolved config, every
metrics line, the eval report and the pictures (W&B offline, MLflow in a local file store, TensorBoard
event files); a tracker whose package is missing is a config error naming the package."""

import json
import struct
from pathlib import Path

import pytest

from sft_cli.config import SFTConfig, validate
from sft_cli.errors import ConfigError
from sft_cli.trackers import chosen, flatten, numbers
from tests.conftest import train_args, write_chat_jsonl


def test_flatten_and_numbers():
    assert flatten({"optim": {"lr": 0.1, "betas": [0.9, 0.95]}, "seed": 1}) == {
        "optim.lr": 0.1, "optim.betas": "[0.9, 0.95]", "seed": 1}
    assert numbers({"a": 1, "b": {"c": 2.5, "d": "x", "e": float("nan")}, "f": True}) == {"a": 1.0, "b/c": 2.5}


def test_a_missing_tracker_package_is_a_config_error_naming_it(monkeypatch, tmp_path, sft):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = SFTConfig(run_dir="x")
    cfg.model.name_or_path = "m"
    cfg.trainer.report_to = ["mlflow", "wandb"]
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert error.value.key == "trainer.report_to[1]" and "pip install wandb" in str(error.value)
    cfg.trainer.report_to = ["neptune"]
    with pytest.raises(ConfigError, match="tensorboard, wandb, mlflow"):
        validate(cfg)
    data = write_chat_jsonl(tmp_path / "chat.jsonl", rows=10)
    result = sft(*train_args(data, tmp_path / "run", "trainer.report_to=[wandb]", verb="prepare"))
    assert result.returncode == 2 and "pip install wandb" in " ".join(result.stderr.split())


def test_default_is_tensorboard_when_installed():
    import importlib.util

    cfg = SFTConfig()
    assert chosen(cfg) == (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    cfg.trainer.report_to = ["wandb", "wandb"]
    assert chosen(cfg) == ["wandb"]


def _wandb_records(path: Path) -> list:
    """The protobuf Records of an offline W&B run file: a 7-byte W&B header, then LevelDB's log format
    (32 KiB blocks of [crc:4][length:2][type:1][data], types FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_every_tracker_gets_config_metrics_report_and_pictures(tmp_path, sft, monkeypatch):
    for package in ("wandb", "mlflow", "tensorboard"):
        pytest.importorskip(package)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # W&B's console capture would wrap the test's stdout
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_chat_jsonl(tmp_path / "chat.jsonl", rows=30, max_words=15)
    run_dir = tmp_path / "run"
    result = sft(*train_args(data, run_dir, "trainer.max_steps=4", "trainer.eval_every=2", "optim.lr=3e-3",
                             "trainer.report_to=[tensorboard,wandb,mlflow]", eval_fraction=0.2, max_seq_len=128))
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = sft("evaluate", f"run_dir={run_dir}", "eval.num_prompts=1", "eval.max_new_tokens=4")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if r.get("type") == "eval"]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    ids = json.loads((run_dir / "trackers.json").read_text())

    # MLflow: one run (train and evaluate both logged into it), read back through its own client.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["trainer.max_steps"] == "4"
    history = client.get_metric_history(ids["mlflow"], "train.loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    assert [m.value for m in client.get_metric_history(ids["mlflow"], "eval.eval_loss")] == pytest.approx(
        [r["eval_loss"] for r in evals])
    assert run.data.metrics["eval_report.tuned.loss"] == pytest.approx(report["models"]["tuned"]["loss"])
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"], "plots")}
    assert artifacts == {"plots/loss_curve.png", "plots/comparison.png"}
    assert {a.path for a in client.list_artifacts(ids["mlflow"], "eval")} == {"eval/report.json"}

    # W&B offline: the run file holds the config, one history row per step and eval, the images, the report.
    run_files = list((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(run_files) == 2  # train, then evaluate resuming the same run id
    records = [r for f in sorted(run_files) for r in _wandb_records(f)]
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert config["optim"]["lr"] == 0.003 and config["max_seq_len"] == 128
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    logged = [row["train/loss"] for row in rows if "train/loss" in row]
    assert logged == pytest.approx([r["loss"] for r in steps])
    assert [row["eval/eval_loss"] for row in rows if "eval/eval_loss" in row] == pytest.approx(
        [r["eval_loss"] for r in evals])
    assert {k.split("/")[1] for row in rows for k in row if k.startswith("plots/")} >= {"loss_curve", "comparison"}
    summary = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for r in records
               if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert summary["eval_report/tuned/loss"] == pytest.approx(report["models"]["tuned"]["loss"])

    # TensorBoard: scalars per step, the config text, the images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"])) for r in steps]
    assert events.Scalars("eval_report/tuned/loss")[0].value == pytest.approx(report["models"]["tuned"]["loss"])
    assert set(events.Tags()["images"]) == {"plots/loss_curve", "plots/comparison"}
    assert "config/text_summary" in events.Tags()["tensors"]
