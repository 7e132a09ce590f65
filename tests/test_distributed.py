"""Multi-process `sft train` on CPU (gloo, real torchrun): equal to one process, exact resume
after SIGKILL of the whole job, two "nodes" on localhost, a dead worker ends the job; resume from
another number of processes or another checkpoint format, checkpoint hashing shared by the ranks."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import train_args, write_chat_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", rows=120, max_words=40)


def args(data, run_dir, *extra):
    return train_args(data, run_dir, "trainer.micro_batch_size=4", "trainer.max_steps=6", "trainer.save_every=2",
                      "optim.lr=2e-3", "peft.dropout=0", *extra)


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


@pytest.mark.parametrize("mode", ["lora-ddp", "full-fsdp", "lora-fsdp-bf16"])
def test_two_processes_equal_one_process_with_accumulation(data, tmp_path, ddp_pair, fsdp_pair, mode):
    """FSDP2 runs use grad_accum 2 per process: gradients are reduce-scattered only on the last
    micro-batch (set_requires_gradient_sync), and the model is built on the meta device with the
    weights sent from rank 0; the result must still equal 1 process x grad_accum 4."""
    if mode == "lora-ddp":
        one, two, err = ddp_pair
        assert "launching 2 worker(s)" in err
    elif mode == "full-fsdp":
        one, two = fsdp_pair
    else:  # LoRA under FSDP2 in bf16: frozen base stored in bf16, adapters float32 masters
        extra = ("trainer.parallel=fsdp", "model.dtype=bfloat16")
        two_proc = start(args(data, tmp_path / "two", "trainer.nproc=2", "trainer.grad_accum=2", *extra))
        run(args(data, tmp_path / "one", "trainer.grad_accum=4", *extra))
        out, err = two_proc.communicate(timeout=600)
        assert two_proc.returncode == 0, err[-3000:]
        one, two = tmp_path / "one", tmp_path / "two"
        assert "trained weights + AdamW float32; frozen bfloat16" in " ".join(out.split())
    if mode != "lora-ddp":
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


# Resuming on several processes: shared checkpoint hashing, FSDP (DCP) resume, another world size.

SHARED_HASHING = """
import json, sys
from pathlib import Path
import sft_cli.checkpoint as ckpt
from sft_cli.distributed import process_group

run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
hashed = []
hash_file = ckpt.hash_file
ckpt.hash_file = lambda path: hashed.append(path.name) or hash_file(path)  # what this rank reads
with process_group() as w:
    report = {"files": ckpt.file_checksums(run_dir / "checkpoints" / "step-2"), "save_share": sorted(hashed)}
    hashed.clear()
    report["verdict"] = ckpt.verify_checkpoint(run_dir / "checkpoints" / "step-4")
    report["verify_share"] = sorted(hashed)
    report["chosen"] = str(ckpt.resumable_checkpoint(run_dir))
    (out / f"rank{w.rank}.json").write_text(json.dumps(report))
"""


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def share_of_rank_1(folder):
    """The files rank 1 of 2 hashes when verifying `folder` (the ones rank 0 never reads)."""
    from sft_cli.checkpoint import checkpoint_manifest, hash_shares

    return hash_shares({name: (folder / name).stat().st_size for name in checkpoint_manifest(folder)["files"]}, 2)[1]


def test_two_ranks_share_checkpoint_hashing_and_agree_on_a_damaged_one(tmp_path):
    from sft_cli.checkpoint import file_checksums
    from sft_cli.run_dir import write_manifest

    run_dir = tmp_path / "run"
    for step in (2, 4):
        folder = run_dir / "checkpoints" / f"step-{step}"
        (folder / "dcp").mkdir(parents=True)
        for rank in (0, 1):
            (folder / "dcp" / f"__{rank}_0.distcp").write_bytes(bytes([step, rank]) * (300_000 + rank))
            (folder / f"rng-rank{rank}.pt").write_bytes(bytes([rank]) * 5000)
        (folder / "trainer_state.json").write_text(f'{{"step": {step}}}')
        write_manifest(folder, "r", {"step": step, "files": file_checksums(folder)})
    damaged = share_of_rank_1(run_dir / "checkpoints" / "step-4")[0]
    flip_a_byte(run_dir / "checkpoints" / "step-4" / damaged)
    script = tmp_path / "hash_on_two_ranks.py"
    script.write_text(SHARED_HASHING)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(run_dir), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = file_checksums(run_dir / "checkpoints" / "step-2")  # one process hashing everything
    for share in ("save_share", "verify_share"):  # each file read by exactly one rank, both ranks busy
        assert ranks[0][share] and ranks[1][share] and not set(ranks[0][share]) & set(ranks[1][share])
        assert len(ranks[0][share] + ranks[1][share]) == 5  # 2 shards, 2 rng files, trainer_state.json
    assert Path(damaged).name in ranks[1]["verify_share"]  # only rank 1 read the damaged file ...
    for report in ranks:  # ... and both ranks know, and both pick the same checkpoint
        assert report["files"] == expected
        assert report["verdict"] == f"{damaged} does not match its recorded sha256"
        assert report["chosen"] == str(run_dir / "checkpoints" / "step-2")


def resume_copy(finished, to, last_kept):
    """A copy of a finished run as if it had stopped after checkpoint step-`last_kept`."""
    shutil.copytree(finished, to)
    shutil.rmtree(to / "final")
    for folder in (to / "checkpoints").glob("step-*"):
        if int(folder.name.removeprefix("step-")) > last_kept:
            shutil.rmtree(folder)
    return to


FSDP = ("peft=none", "trainer.parallel=fsdp")
FSDP_TWO = (*FSDP, "trainer.nproc=2", "trainer.grad_accum=2")


@pytest.fixture(scope="module")
def fsdp_pair(data, tmp_path_factory):
    """Full fine-tuning: 2 processes x grad_accum 2 under FSDP2 (DCP checkpoints) and 1 process x
    grad_accum 4 (plain checkpoints: one process shards nothing), both finished."""
    root = tmp_path_factory.mktemp("fsdp")
    two = start(args(data, root / "two", *FSDP_TWO))
    run(args(data, root / "one", "trainer.grad_accum=4", *FSDP))
    out, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    assert "weights read by rank 0, sent into each rank's shards" in " ".join(out.split())
    return root / "one", root / "two"


def test_fsdp_resume_on_two_processes_equals_an_uninterrupted_run(data, tmp_path, fsdp_pair):
    _, straight = fsdp_pair
    resumed = resume_copy(straight, tmp_path / "resumed", last_kept=6)  # stopped before final/ was written
    # step-6 is damaged where only rank 1 looks: both ranks must refuse it and resume from step-4.
    flip_a_byte(resumed / "checkpoints" / "step-6" / share_of_rank_1(resumed / "checkpoints" / "step-6")[0])
    err = run(args(data, resumed, *FSDP_TWO))
    assert "refusing checkpoint" in err and "resuming from the previous checkpoint step-4" in err
    assert "(step 4 of 6)" in err
    assert losses(resumed) == losses(straight)  # bitwise: same world size, DCP restores exactly
    a, b = final_weights(resumed), final_weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_one_process_checkpoint_resumes_under_fsdp_on_two_processes(data, tmp_path, fsdp_pair):
    """parallel=fsdp shards nothing in one process: its plain files must load into FSDP2 shards."""
    one, straight = fsdp_pair
    grown = resume_copy(one, tmp_path / "grown", last_kept=4)
    assert not (grown / "checkpoints" / "step-4" / "dcp").exists()
    err = run(args(data, grown, *FSDP_TWO))
    assert "(step 4 of 6)" in err
    assert (grown / "checkpoints" / "step-6" / "dcp").is_dir()
    assert_close(losses(grown), losses(straight))
    assert_same_weights(final_weights(grown), final_weights(straight))


def test_a_one_process_checkpoint_resumes_on_two_processes(data, tmp_path, ddp_pair):
    """Saved by 1 process x grad_accum 2, resumed by 2 processes x grad_accum 1: the same rows per
    step, so the same run; rank 1 has no RNG file of its own and needs none (per-step seeding)."""
    one, two, _ = ddp_pair
    grown = resume_copy(one, tmp_path / "grown", last_kept=4)
    assert sorted(p.name for p in (grown / "checkpoints" / "step-4").glob("rng-rank*")) == ["rng-rank0.pt"]
    err = run(args(data, grown, "trainer.nproc=2"))
    assert "launching 2 worker(s)" in err and "(step 4 of 6)" in err
    records = [json.loads(x) for x in (grown / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # the step count continues
    assert json.loads((grown / "checkpoints" / "step-6" / "trainer_state.json").read_text())["world_size"] == 2
    # 1 and 2 processes differ only in the order gradients are summed.
    assert_close(losses(grown), losses(two))
    assert_same_weights(final_weights(grown), final_weights(two))
