"""Faults during training, prepare and pack: the run state is never corrupted, and the end
result equals an uninterrupted run's, bitwise on CPU.

  * SIGKILL of the whole process at random moments (mid-step, mid-checkpoint, mid-eval), resuming
    each time: same loss sequence, same final weights as the uninterrupted run;
  * SIGKILL while a checkpoint is half written: ignored on the next start;
  * a checkpoint whose files fail their recorded checksums: refused with a message, the one
    before it is used; all damaged: a clear error, never a silent restart;
  * disk full while saving: a clear error, the previous checkpoint intact and resumable;
  * non-finite loss at a step: skipped and reported; repeated: a clean stop;
  * prepare / pack killed before their output is in place: the next run rebuilds, never reads it.

`make test-slow` runs these; the slowest variant (5 kills in one run) is opt-in: `pytest -m reliability_slow` (make reliability).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import train_args, write_chat_jsonl

# slow: every run here is a process of its own (it is SIGKILLed, or resumes one that was): make test-slow.
pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
SLOW = pytest.mark.reliability_slow


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    # NEFTune noise and LoRA dropout on: resume must restore every RNG, not just the weights.
    return train_args(data, run_dir, "trainer.micro_batch_size=2", "trainer.grad_accum=2",
                      f"trainer.max_steps={STEPS}", "trainer.save_every=2", "trainer.eval_every=4", "optim.lr=2e-3",
                      "trainer.neftune_alpha=5", "peft.dropout=0.1", *extra)


def _sft(args: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "1000", **(env or {})}  # wide: no message wrapped mid-path
    return subprocess.run([sys.executable, "-m", "sft_cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kwargs)


def _metric_lines(run_dir: Path) -> list[dict]:
    """Every whole metrics line but the timings (the machine's, not the run's); a line torn by a
    kill is left out."""
    timing = ("tokens_per_sec", "elapsed_s", "mfu", "peak_mem_mb")
    lines = []
    for text in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            lines.append({k: v for k, v in json.loads(text).items() if k not in timing})
        except json.JSONDecodeError:
            continue
    return lines


def _trajectory(run_dir: Path) -> tuple[list, dict]:
    """(every metrics line but the timings, final trainable weights): what 'same run' means."""
    from safetensors.torch import load_file

    return _metric_lines(run_dir), load_file(str(run_dir / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors"))


def _same_run(run_dir: Path, baseline) -> bool:
    lines, weights = _trajectory(run_dir)
    base_lines, base_weights = baseline
    return lines == base_lines and weights.keys() == base_weights.keys() and all(
        torch.equal(weights[k], base_weights[k]) for k in weights)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", rows=120, max_words=40)


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = _sft(_args(data, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return _trajectory(run_dir)


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a torn line being written
    return 0


def kill_at_random_moments(args: list[str], run_dir: Path, kills: int, seed: int,
                           after_a_kill=lambda finished: None) -> int:
    """Launch `sft train` again and again, SIGKILLing the whole process group at a random moment
    after a random step, until it finishes; returns how many kills landed. When the process that
    resumed from a kill ends (killed in turn, or finished), `after_a_kill(finished)` is called."""
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, STEPS), kills))
    landed, resumed_from_a_kill = 0, False
    for target in [*targets, None]:
        proc = subprocess.Popen([sys.executable, "-m", "sft_cli", *args], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed = False
        if target is not None:
            deadline = time.time() + 300
            while proc.poll() is None and _last_step(run_dir / "metrics.jsonl") < target and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.4))  # anywhere in the next step: forward, backward, save, eval
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                landed, killed = landed + 1, True
        _, err = proc.communicate(timeout=600)
        if resumed_from_a_kill:
            after_a_kill(finished=not killed)
        resumed_from_a_kill = killed
        if target is None:
            assert proc.returncode == 0, err[-3000:]
    return landed


@pytest.mark.parametrize("kills", [
    pytest.param(2, id="2-kills"),
    pytest.param(5, id="5-kills", marks=SLOW),
])
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(data, baseline, tmp_path, kills, trials):
    # A trial per kill that landed: the process resumed after it stayed on the uninterrupted run's
    # trajectory (its metrics so far are the uninterrupted run's first lines; when it finished, the
    # whole run is the uninterrupted one, weights included).
    run_dir = tmp_path / "run"

    def recovered(finished: bool) -> None:
        with trials.trial(f"kill {trials.count + 1}"):
            if finished:
                assert _same_run(run_dir, baseline)
            else:
                lines = _metric_lines(run_dir)
                assert lines == baseline[0][:len(lines)]

    landed = kill_at_random_moments(_args(data, run_dir), run_dir, kills, seed=kills, after_a_kill=recovered)
    assert trials.count == landed
    trials.check()
    assert landed >= kills - 1  # a kill aimed at the very end may find the run already done
    assert _same_run(run_dir, baseline)


def test_sigkill_while_writing_a_checkpoint_is_ignored_on_restart(data, baseline, tmp_path):
    run_dir = tmp_path / "run"
    killed = _sft(_args(data, run_dir), env={"SFT_FAULT_KILL_AT": "checkpoint:6"})
    assert killed.returncode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".step-6.tmp").is_dir() and not (checkpoints / "step-6").exists()
    resumed = _sft(_args(data, run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step-4" in resumed.stderr
    assert not (checkpoints / ".step-6.tmp").exists()  # the leftover is cleaned, never read
    assert _same_run(run_dir, baseline)


def _flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("damage", ["flip-weights", pytest.param("flip-optimizer", marks=SLOW),
                                    pytest.param("truncate-rng", marks=SLOW),
                                    pytest.param("delete-scheduler", marks=SLOW)])
def test_checkpoint_failing_its_checksums_is_refused_and_the_previous_used(data, baseline, tmp_path, damage):
    run_dir = tmp_path / "run"
    assert _sft(_args(data, run_dir), env={"SFT_FAULT_KILL_STEP": "7"}).returncode == -signal.SIGKILL
    newest = run_dir / "checkpoints" / "step-6"
    assert newest.is_dir() and (run_dir / "checkpoints" / "step-4").is_dir()
    if damage == "flip-weights":
        _flip_a_byte(newest / "trainable.safetensors")
    elif damage == "flip-optimizer":
        _flip_a_byte(newest / "optimizer.pt")
    elif damage == "truncate-rng":
        (newest / "rng-rank0.pt").write_bytes((newest / "rng-rank0.pt").read_bytes()[:100])
    else:
        (newest / "scheduler.pt").unlink()
    resumed = _sft(_args(data, run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "refusing checkpoint" in resumed.stderr and "step-6" in resumed.stderr
    assert "resuming from" in resumed.stderr and "step-4" in resumed.stderr
    assert _same_run(run_dir, baseline)


def test_all_checkpoints_damaged_is_a_clear_error_not_a_silent_restart(data, tmp_path):
    run_dir = tmp_path / "run"
    assert _sft(_args(data, run_dir), env={"SFT_FAULT_KILL_STEP": "5"}).returncode == -signal.SIGKILL
    for folder in (run_dir / "checkpoints").glob("step-*"):
        _flip_a_byte(folder / "trainable.safetensors")
    result = _sft(_args(data, run_dir))
    assert result.returncode == 1 and "no usable checkpoint" in result.stderr and "resume=never" in result.stderr
    assert "Traceback" not in result.stderr


def test_disk_full_while_saving_is_a_clear_error_and_the_previous_checkpoint_survives(data, baseline, tmp_path):
    run_dir = tmp_path / "run"
    full = _sft(_args(data, run_dir), env={"SFT_FAULT_ENOSPC_AT": "checkpoint:6"})
    assert full.returncode == 1, full.stderr[-3000:]
    assert "No space left on device" in full.stderr and "step-4" in full.stderr and "intact" in full.stderr
    assert "Traceback" not in full.stderr
    from sft_cli.checkpoint import verify_checkpoint

    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / ".step-6.tmp").exists() and not (checkpoints / "step-6").exists()
    assert verify_checkpoint(checkpoints / "step-4") is None
    resumed = _sft(_args(data, run_dir))
    assert resumed.returncode == 0 and "step-4" in resumed.stderr, resumed.stderr[-3000:]
    assert _same_run(run_dir, baseline)


def test_non_finite_loss_is_skipped_and_reported_and_repeated_stops_cleanly(data, tmp_path, trials):
    from safetensors.torch import load_file

    with trials.trial("one non-finite step"):
        once = _sft(_args(data, tmp_path / "once"), env={"SFT_FAULT_NAN_STEPS": "3"})
        assert once.returncode == 0, once.stderr[-3000:]
        assert "step 3: non-finite" in once.stderr
        weights = load_file(str(tmp_path / "once" / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values())
    with trials.trial("non-finite steps past max_bad_steps"):
        repeated = _sft(_args(data, tmp_path / "rep", "trainer.max_bad_steps=2"),
                        env={"SFT_FAULT_NAN_STEPS": "3,4,5,6"})
        assert repeated.returncode == 1 and "non-finite steps in a row" in repeated.stderr
        assert "Traceback" not in repeated.stderr
        for folder in (tmp_path / "rep" / "checkpoints").glob("step-*"):  # NaN weights are never saved
            saved = load_file(str(folder / "trainable.safetensors"))
            assert all(torch.isfinite(t).all() for t in saved.values())
    trials.check()


def _dataset_rows(folder: Path) -> list:
    import datasets

    splits = datasets.load_from_disk(str(folder))
    return [splits[name].to_dict() for name in sorted(splits)]


@pytest.mark.parametrize("stage", ["prepare", pytest.param("pack", marks=SLOW)])
def test_killed_prepare_or_pack_is_rebuilt_never_read(data, tmp_path, stage, trials):
    out_name = {"prepare": "prepared", "pack": "packed"}[stage]
    clean, run_dir = tmp_path / "clean", tmp_path / "run"
    args = lambda d, *extra: [stage, *_args(data, d, *extra)[1:]]  # noqa: E731
    assert _sft(args(clean)).returncode == 0
    with trials.trial("killed before its output is in place"):
        # Everything written but not yet renamed into place: nothing under the real name.
        killed = _sft(args(run_dir), env={"SFT_FAULT_KILL_AT": out_name})
        assert killed.returncode == -signal.SIGKILL
        assert not (run_dir / out_name).exists() and list(run_dir.glob(f".{out_name}.tmp-*"))
        rebuilt = _sft(args(run_dir))
        assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
        assert not list(run_dir.glob(f".{out_name}.tmp-*"))  # the dead writer's leftover is removed
        assert _dataset_rows(run_dir / out_name) == _dataset_rows(clean / out_name)
    with trials.trial("killed while replacing an older output"):
        # A changed config: the old output stays whole and is recognised as stale by its
        # fingerprint, so the next run rebuilds it.
        changed = _sft(args(run_dir, "max_seq_len=200"), env={"SFT_FAULT_KILL_AT": out_name})
        assert changed.returncode == -signal.SIGKILL
        assert _dataset_rows(run_dir / out_name) == _dataset_rows(clean / out_name)
        again = _sft(args(run_dir, "max_seq_len=200"))
        assert again.returncode == 0, again.stderr[-3000:]
        report = json.loads((run_dir / out_name / "report.json").read_text())
        assert report["max_seq_len"] == 200
    trials.check()


class _RunsCodeOnLoad:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):  # unpickling calls open(sentinel, "w"): proof that code ran
        return (open, (str(self.sentinel), "w"))


def test_a_checkpoint_file_that_would_run_code_is_refused(data, tmp_path):
    """a checkpoint that would run code on load (checksums forged to match) is refused"""
    import pickle

    from sft_cli.checkpoint import file_checksums
    from sft_cli.run_dir import write_json_atomic

    run_dir, sentinel = tmp_path / "run", tmp_path / "pwned"
    assert _sft(_args(data, run_dir), env={"SFT_FAULT_KILL_STEP": "5"}).returncode == -signal.SIGKILL
    newest = run_dir / "checkpoints" / "step-4"
    (newest / "scheduler.pt").write_bytes(pickle.dumps(_RunsCodeOnLoad(sentinel)))
    manifest = json.loads((newest / "manifest.json").read_text())
    write_json_atomic(newest / "manifest.json", {**manifest, "files": file_checksums(newest)})
    result = _sft(_args(data, run_dir))
    assert result.returncode == 1 and "refusing to load" in result.stderr and "scheduler.pt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not sentinel.exists()
