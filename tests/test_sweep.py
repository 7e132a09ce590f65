"""Sweeps and provenance: a 2x2 sweep leaves one summary and per-point run dirs, repeats bitwise,
skips finished points, records a failed point and goes on; a run replays from its saved config."""

import json
from pathlib import Path

import pytest

from tests.conftest import write_chat_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", rows=60, max_words=30)


def base(data, run_dir):
    return ["model.name_or_path=builtin:tiny-llama-chatml", f"data.sources=[{{path: {data}}}]",
            "data.eval_fraction=0.1", "max_seq_len=256", "trainer.max_steps=3", "trainer.micro_batch_size=2",
            f"run_dir={run_dir}"]


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


POINTS = {"optim.lr=0.0001,seed=0", "optim.lr=0.0001,seed=1", "optim.lr=0.0003,seed=0", "optim.lr=0.0003,seed=1"}


def test_a_saved_2x2_sweep_summarises_repeats_bitwise_and_skips_finished_points(data, tmp_path, sft):
    first = sft("train", *base(data, tmp_path / "a"), "+sweep=lr-seed")  # conf/sweep/lr-seed.yaml
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "a" / "sweep.json").read_text())["points"]
    assert {Path(p["run_dir"]).name for p in summary} == POINTS
    for point in summary:
        assert point["status"] == "ok" and point["steps"] == 3
        assert point["final_train_loss"] > 0 and point["best_eval_loss"] > 0 and point["tokens_per_sec"] > 0
        assert (Path(point["run_dir"]) / "final" / "manifest.json").exists()
        provenance = json.loads((Path(point["run_dir"]) / "provenance.json").read_text())
        assert provenance["command"].startswith("sft train") and provenance["fingerprints"]["prepared"]
        assert provenance["versions"]["torch"]
    assert (tmp_path / "a" / "sweep.csv").read_text().count("\n") == 5
    assert (tmp_path / "a" / "sweep_losses.png").read_bytes()[:4] == b"\x89PNG"
    # The same sweep elsewhere reproduces every point bitwise.
    again = sft("train", "-m", *base(data, tmp_path / "b"), "optim.lr=1e-4,3e-4", "seed=0,1")
    assert again.returncode == 0, again.stderr[-3000:]
    for name in POINTS:
        assert losses(tmp_path / "a" / name) == losses(tmp_path / "b" / name)
    # Re-running a finished sweep trains nothing and still summarises.
    rerun = sft("train", *base(data, tmp_path / "a"), "+sweep=lr-seed")
    assert rerun.returncode == 0 and rerun.stderr.count("already finished") == 4, rerun.stderr[-3000:]
    assert len(json.loads((tmp_path / "a" / "sweep.json").read_text())["points"]) == 4


def test_a_failed_point_is_recorded_and_the_sweep_goes_on(data, tmp_path, sft):
    result = sft("train", "-m", *base(data, tmp_path / "s"), "optim.schedule=bogus,linear")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    points = {Path(p["run_dir"]).name: p for p in json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]}
    assert points["optim.schedule=linear"]["status"] == "ok"  # ran after the failed point
    failed = points["optim.schedule=bogus"]
    assert failed["status"] == "failed" and "optim.schedule" in failed["error"]


def test_a_run_replays_from_its_saved_config(data, tmp_path, sft):
    original = sft("train", *base(data, tmp_path / "orig"), "optim.lr=3e-3", "trainer.neftune_alpha=5")
    assert original.returncode == 0, original.stderr[-3000:]
    replay = sft("train", f"recipe={tmp_path / 'orig' / 'config.yaml'}", f"run_dir={tmp_path / 'replay'}")
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert losses(tmp_path / "replay") == losses(tmp_path / "orig")
