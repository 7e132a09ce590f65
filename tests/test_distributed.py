"""Multi-process `sft train` on CPU (gloo, real torchrun): equal to one process, exact resume
after SIGKILL of the whole job, two "nodes" on localhost, a dead worker ends the job."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_chat_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", rows=120, max_words=40)


def args(data, run_dir, *extra):
    return ["train", "model.name_or_path=builtin:tiny-llama-chatml", f"data.sources=[{{path: {data}}}]",
            "data.eval_fraction=0.1", "max_seq_len=256", f"run_dir={run_dir}", "trainer.micro_batch_size=4",
            "trainer.max_steps=6", "trainer.save_every=2", "optim.lr=2e-3", "peft.dropout=0", *extra]


def start(argv, **kw):
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "sft_cli", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run(argv, **kw):
    proc = start(argv, **kw)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


def losses(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("eval_loss")) for r in lines]


def final_weights(run_dir):
    final = Path(run_dir) / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors"
    return load_file(str(final / name))


def assert_close(a, b, rel=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


def assert_same_weights(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        scale = max(b[key].abs().max().item(), 1e-12)
        assert (a[key] - b[key]).abs().max().item() <= rel * scale, key


@pytest.fixture(scope="module")
def ddp_pair(data, tmp_path_factory):
    """LoRA: 2 processes x micro-batch 4 (DDP) and 1 process x micro-batch 4 x grad_accum 2."""
    root = tmp_path_factory.mktemp("ddp")
    two = start(args(data, root / "two", "trainer.nproc=2"))
    run(args(data, root / "one", "trainer.grad_accum=2"))
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    return root / "one", root / "two", err


@pytest.mark.parametrize("mode", ["lora-ddp", "full-fsdp"])
def test_two_processes_equal_one_process_with_accumulation(data, tmp_path, ddp_pair, mode):
    if mode == "lora-ddp":
        one, two, err = ddp_pair
        assert "launching 2 worker(s)" in err
    else:
        extra = ("peft=none", "trainer.parallel=fsdp")
        two_proc = start(args(data, tmp_path / "two", "trainer.nproc=2", *extra))
        run(args(data, tmp_path / "one", "trainer.grad_accum=2", *extra))
        _, err = two_proc.communicate(timeout=600)
        assert two_proc.returncode == 0, err[-3000:]
        one, two = tmp_path / "one", tmp_path / "two"
        assert any(p.name == "dcp" for p in (two / "checkpoints").glob("step-*/*"))  # sharded checkpoints
    assert_close(losses(two), losses(one))  # per-step train losses and the final eval loss
    assert len(losses(one)) == 7
    assert_same_weights(final_weights(two), final_weights(one))


def test_exact_resume_of_a_two_process_job_after_sigkill(data, tmp_path):
    extra = ("trainer.nproc=2", "trainer.neftune_alpha=5", "peft.dropout=0.1", "trainer.max_steps=8")
    run(args(data, tmp_path / "straight", *extra))
    # Mid-step 5 (after backward, before the update) both workers SIGKILL themselves and the
    # launcher's process group (the launcher and torchrun's agent): the whole job dies at once.
    job = start(args(data, tmp_path / "resumed", *extra), start_new_session=True,
                env={"SFT_FAULT_KILL_STEP": "5", "SFT_FAULT_KILL_GROUP": "1"})
    job.communicate(timeout=600)
    assert job.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    assert not (tmp_path / "resumed" / "final").exists()
    err = run(args(data, tmp_path / "resumed", *extra))
    assert "resuming" in err
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bitwise
    a, b = final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_nodes_on_localhost_match_two_processes(data, tmp_path, ddp_pair):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [start(args(data, tmp_path / "nodes", "trainer.nnodes=2", f"trainer.node_rank={rank}",
                        f"trainer.rdzv_endpoint=127.0.0.1:{port}")) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    _, two, _ = ddp_pair
    assert_close(losses(tmp_path / "nodes"), losses(two))
    assert_same_weights(final_weights(tmp_path / "nodes"), final_weights(two))


def test_a_killed_worker_ends_the_job_with_a_clear_error(data, tmp_path):
    began = time.time()
    job = start(args(data, tmp_path / "dead", "trainer.nproc=2", "trainer.max_steps=50"),
                env={"SFT_FAULT_KILL_STEP": "3", "SFT_FAULT_KILL_RANK": "1"})
    _, err = job.communicate(timeout=300)
    metrics = [json.loads(x) for x in (tmp_path / "dead" / "metrics.jsonl").read_text().splitlines()]
    assert job.returncode == 1
    assert "worker rank 1 failed (signal SIGKILL)" in err and "Traceback" not in err
    assert len(metrics) == 2  # the job ended at the crash, it did not train on without rank 1
    assert time.time() - began < 120


def test_a_rendezvous_port_in_use_is_a_config_error(data, tmp_path):
    with socket.socket() as sock:
        sock.bind(("", 0))
        sock.listen()
        port = sock.getsockname()[1]
        job = start(args(data, tmp_path / "port", "trainer.nproc=2", f"trainer.rdzv_endpoint=127.0.0.1:{port}"))
        _, err = job.communicate(timeout=300)
    assert job.returncode == 2 and "trainer.rdzv_endpoint" in err and "in use" in err


def test_an_outer_torchrun_is_joined_not_spawned_again(data, tmp_path, ddp_pair):
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "sft_cli",
                             *args(data, tmp_path / "outer")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching" not in result.stderr  # joined torchrun's job instead of starting workers of its own
    _, two, _ = ddp_pair
    assert_close(losses(tmp_path / "outer"), losses(two))
