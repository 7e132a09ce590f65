"""Sweeps and provenance: a 2x2 sweep leaves one summary and per-point run dirs, repeats bitwise,
skips finished points, records a failed point and goes on; a run replays from its saved config."""

import json
from pathlib import Path

import pytest

from tests.conftest import train_args, write_chat_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", rows=60, max_words=30)


def base(data, run_dir):
    return train_args(data, run_dir, "trainer.max_steps=3", "trainer.micro_batch_size=2", verb=None)


def metrics(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]


POINTS = {"optim.lr=0.0001,seed=0", "optim.lr=0.0001,seed=1", "optim.lr=0.0003,seed=0", "optim.lr=0.0003,seed=1"}


def test_a_saved_2x2_sweep_summarises_repeats_bitwise_and_skips_finished_points(data, tmp_path, sft):
    first = sft("train", *base(data, tmp_path / "a"), "+sweep=lr-seed")  # conf/sweep/lr-seed.yaml
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "a" / "sweep.json").read_text())["points"]
    assert {Path(p["run_dir"]).name for p in summary} == POINTS
    for point in summary:
        assert point["status"] == "ok" and point["steps"] == 3
        # The summary holds what the point's own metrics say: last train loss, lowest eval loss,
        # tokens over wall time, and the point's own overrides.
        lines = metrics(point["run_dir"])
        steps = [r for r in lines if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        assert point["final_train_loss"] == steps[-1]["loss"]
        assert point["best_eval_loss"] == min(r["eval_loss"] for r in lines if r.get("type") == "eval")
        assert point["wall_s"] == steps[-1]["elapsed_s"]
        assert point["tokens_per_sec"] == pytest.approx(sum(r["tokens"] for r in steps) / steps[-1]["elapsed_s"])
        assert set(Path(point["run_dir"]).name.split(",")) <= set(point["overrides"].split())
        assert (Path(point["run_dir"]) / "final" / "manifest.json").exists()
        provenance = json.loads((Path(point["run_dir"]) / "provenance.json").read_text())
        assert provenance["command"].startswith("sft train") and provenance["fingerprints"]["prepared"]
        assert provenance["versions"]["torch"]
    # Same seed, different lr: the same first loss (measured before any update), then apart.
    curves = {Path(p["run_dir"]).name: losses(p["run_dir"]) for p in summary}
    for seed in (0, 1):
        low, high = curves[f"optim.lr=0.0001,seed={seed}"], curves[f"optim.lr=0.0003,seed={seed}"]
        assert low[0] == high[0] and low[-1] != high[-1]
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


def test_swept_keys_read_the_command_line_as_hydra_does():
    from sft_cli.cli import swept_keys

    assert swept_keys(["optim.lr=1e-4,3e-4", "run_dir='runs/a,b'", "data.sources=[{path: a}, {path: b}]",
                       "seed=range(0,2)", "+peft.r=4,8", "hydra.searchpath=[file:///x]", "max_seq_len=128"]) \
        == ["optim.lr", "seed", "peft.r"]


def test_a_default_named_sweep_point_replays_from_its_config_yaml(tmp_path, sft):
    """Point folders are named like `seed=0,max_seq_len=128`; here the data, the chat template and
    the sweep's run_dir also hold commas, `=`, spaces, brackets and non-ASCII letters."""
    weird = tmp_path / "dätä, [1] =x"
    data = write_chat_jsonl(weird / "chat.jsonl", rows=20, max_words=10)
    template = weird / "chat ml.jinja"
    template.write_text((Path(__file__).resolve().parent.parent / "sft_cli/templates/chatml.jinja").read_text())
    sweep_dir = tmp_path / "runs, [ü]=1"
    sweep_dir.mkdir()  # exists, so with -m it is one path, not a sweep over run_dirs
    result = sft("prepare", "-m", "model.name_or_path=builtin:tiny-llama-chatml", f"data.sources=[{{path: {data}}}]",
                 f"data.chat_template={template}", f"run_dir={sweep_dir}", "seed=0,1", "max_seq_len=128,256")
    assert result.returncode == 0, result.stderr[-3000:]
    point = sweep_dir / "seed=1,max_seq_len=256"
    assert {p["run_dir"] for p in json.loads((sweep_dir / "sweep.json").read_text())["points"]} == {
        str(sweep_dir / f"seed={s},max_seq_len={n}") for s in (0, 1) for n in (128, 256)}
    replay_dir = tmp_path / "replay, x=1"
    replay = sft("prepare", f"recipe={point / 'config.yaml'}", f"run_dir={replay_dir}")
    assert replay.returncode == 0, replay.stderr[-3000:]
    original, replayed = ((d / "config.yaml").read_text().splitlines() for d in (point, replay_dir))
    assert replayed[0] == f"run_dir: {replay_dir}" and replayed[1:] == original[1:]

    def fingerprint(run_dir):
        return json.loads((run_dir / "prepared" / "manifest.json").read_text())["fingerprint"]

    assert fingerprint(replay_dir) == fingerprint(point)
