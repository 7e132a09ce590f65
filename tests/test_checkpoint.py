"""Checkpoints in one process: files saved on a GPU load on any device, RNG states round-trip,
resuming on another number of processes is allowed, and shared hashing equals hashing alone.
(The collective paths on 2 real processes are in test_distributed.py.)"""

import contextlib
import io
import json
import random
import zipfile

import numpy as np
import pytest
import torch

from sft_cli.checkpoint import (
    _load_tensors,
    file_checksums,
    hash_shares,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from sft_cli.config import SFTConfig
from sft_cli.distributed import full_value
from sft_cli.run_dir import hash_file
from sft_cli.schedule import build_optimizer, build_scheduler


def tag_storages_cuda(path):
    """Rewrite a CPU tensor file as if it had been saved from cuda:0: the same bytes with each
    storage's location tag (the string "cpu" in its pickle, written once then memoised) changed."""
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # BINUNICODE: length, utf-8
                assert data.count(cpu) == 1, "expected one location tag"
                data = data.replace(cpu, cuda)
            target.writestr(info, data)
    path.write_bytes(out.getvalue())


def train_steps(model, optimizer, scheduler, steps):
    for step in steps:  # each step's batch is a function of its number: resumed == uninterrupted
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        model(x).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def tiny_training(seed=0, steps=range(2), shard=False):
    """Two Linears, their AdamW and lr schedule after `steps` real steps (the optimizer has state);
    `shard`: under FSDP2 (each layer its own shard group, as distributed.wrap does)."""
    cfg = SFTConfig()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=10)
    train_steps(model, optimizer, scheduler, steps)
    return cfg, model, optimizer, scheduler


@contextlib.contextmanager
def one_rank_job(tmp_path):
    """A real process group of one rank (gloo) in this process: enough for FSDP2 and DCP."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def full_params(model):
    return [full_value(p.detach()).clone() for p in model.parameters()]


def assert_same_params(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max() <= 1e-6 * y.abs().max(), (x, y)


@pytest.fixture
def saved(tmp_path):
    cfg, model, optimizer, scheduler = tiny_training()
    state = {"step": 2, "tokens": 10, "loss_tokens": 8, "bad_streak": 0, "elapsed_s": 1.0}
    folder = save_checkpoint(tmp_path, 2, model, model, optimizer, scheduler, state, cfg, {"run": "r"}, keep_last=2)
    return folder, model, optimizer, scheduler


def test_a_tensor_file_saved_on_cuda_loads_on_the_cpu(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg": torch.arange(3.0)}}, "step": torch.tensor(2.0)}, path)
    tag_storages_cuda(path)
    if not torch.cuda.is_available():  # the file really is cuda-tagged: torch refuses it as it is
        with pytest.raises(RuntimeError, match="deserialize object on a CUDA device"):
            torch.load(path, weights_only=True)
    loaded = _load_tensors(path)
    assert loaded["state"][0]["exp_avg"].device.type == "cpu"  # on a GPU machine too: never all on GPU 0
    assert torch.equal(loaded["state"][0]["exp_avg"], torch.arange(3.0))


def test_an_optimizer_saved_on_cuda_resumes_on_the_cpu(saved):
    folder, model, optimizer, scheduler = saved
    tag_storages_cuda(folder / "optimizer.pt")
    _, fresh_model, fresh_optimizer, fresh_scheduler = tiny_training(seed=1)
    load_checkpoint(folder, fresh_model, fresh_model, fresh_optimizer, fresh_scheduler)
    # load_state_dict put each state beside its parameter (here the CPU), bit for bit.
    for param, fresh in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(optimizer.state[param]["exp_avg"], fresh_optimizer.state[fresh]["exp_avg"])
        assert fresh_optimizer.state[fresh]["exp_avg"].device == fresh.device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_plain_files_resume_under_fsdp2(tmp_path):
    """Saved by one process (parallel=auto: nothing), resumed by a job that shards (auto: FSDP2)."""
    cfg, model, optimizer, scheduler = tiny_training()
    state = {"step": 2, "tokens": 0, "loss_tokens": 0, "bad_streak": 0, "elapsed_s": 0.0}
    folder = save_checkpoint(tmp_path, 2, model, model, optimizer, scheduler, state, cfg, {"run": "r"}, keep_last=2)
    train_steps(model, optimizer, scheduler, [2, 3])
    with one_rank_job(tmp_path):
        _, sharded, sharded_optimizer, sharded_scheduler = tiny_training(seed=1, steps=[], shard=True)
        load_checkpoint(folder, sharded, sharded, sharded_optimizer, sharded_scheduler)
        train_steps(sharded, sharded_optimizer, sharded_scheduler, [2, 3])  # Adam moments and step count came back
        assert_same_params(full_params(sharded), full_params(model))


def test_fsdp2_shards_resume_in_one_process(tmp_path):
    with one_rank_job(tmp_path):
        cfg, sharded, optimizer, scheduler = tiny_training(shard=True)
        state = {"step": 2, "tokens": 0, "loss_tokens": 0, "bad_streak": 0, "elapsed_s": 0.0}
        folder = save_checkpoint(tmp_path, 2, sharded, sharded, optimizer, scheduler, state, cfg, {"run": "r"}, 2)
        assert (folder / "dcp").is_dir() and not (folder / "optimizer.pt").exists()
        train_steps(sharded, optimizer, scheduler, [2, 3])
        expected = full_params(sharded)
    _, model, fresh_optimizer, fresh_scheduler = tiny_training(seed=1, steps=[])
    load_checkpoint(folder, model, model, fresh_optimizer, fresh_scheduler)
    train_steps(model, fresh_optimizer, fresh_scheduler, [2, 3])
    assert_same_params(full_params(model), expected)


def test_rng_state_round_trips_through_a_file(tmp_path):
    seed_everything(1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(2)
    set_rng_state(_load_tensors(tmp_path / "rng.pt"))  # weights_only: plain tensors and numbers
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_only_this_ranks_gpu_state_is_saved_and_restored_to_it(monkeypatch):
    """Local rank 1 of a machine with several GPUs: one state, its own GPU's, back onto that GPU."""
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda where: calls.append(("get", where)) or torch.ones(2))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, where: calls.append(("set", where)))
    state = rng_state()
    assert torch.equal(state["cuda"], torch.ones(2))
    set_rng_state(state)
    assert calls == [("get", torch.device("cuda", 1)), ("set", torch.device("cuda", 1))]


def test_resume_on_another_world_size_without_this_ranks_rng_file(saved):
    """A rank with no rng file (more processes than saved) and a different saved world size load."""
    folder, model, optimizer, scheduler = saved
    (folder / "rng-rank0.pt").unlink()
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**trainer_state, "world_size": 2}))
    _, fresh_model, fresh_optimizer, fresh_scheduler = tiny_training(seed=1)
    state = load_checkpoint(folder, fresh_model, fresh_model, fresh_optimizer, fresh_scheduler)
    assert state["step"] == 2 and state["world_size"] == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))
    assert fresh_scheduler.state_dict() == scheduler.state_dict()


def test_hash_shares_by_hand():
    # Largest first, each to the lightest rank: a(5)->0, b(4)->1, c(3)->1 (4<5), d(1)->0 (5<7).
    assert hash_shares({"a": 5, "b": 4, "c": 3, "d": 1}, 2) == [["a", "d"], ["b", "c"]]
    assert hash_shares({"a": 5}, 3) == [["a"], [], []]  # more ranks than files: some hash nothing
    assert hash_shares({}, 2) == [[], []]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_hash_shares_cover_every_file_once_balanced_by_bytes(world_size):
    rng = np.random.default_rng(world_size)
    # FSDP-like: one big shard per rank of a bigger job, plus small files.
    sizes = {f"dcp/__{i}_0.distcp": int(rng.integers(10**6, 2 * 10**6)) for i in range(16)}
    sizes |= {f"rng-rank{i}.pt": int(rng.integers(1000, 2000)) for i in range(16)}
    sizes |= {"dcp/.metadata": 50_000, "scheduler.pt": 900, "trainer_state.json": 120, "config.yaml": 3000}
    shares = hash_shares(sizes, world_size)
    assert len(shares) == world_size
    assert sorted(name for share in shares for name in share) == sorted(sizes)  # each exactly once
    loads = [sum(sizes[name] for name in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert shares == hash_shares(dict(reversed(sizes.items())), world_size)  # any listing order: same deal


@pytest.mark.parametrize("world_size", [2, 3])
def test_shared_hashing_gives_the_manifest_one_process_gives(saved, world_size):
    folder = saved[0]
    (folder / "dcp").mkdir()
    (folder / "dcp" / "__0_0.distcp").write_bytes(bytes(range(256)) * 5000)  # a subfolder, a bigger file
    alone = file_checksums(folder)
    assert "manifest.json" not in alone and "dcp/__0_0.distcp" in alone
    sizes = {name: (folder / name).stat().st_size for name in alone}
    merged = {}
    for share in hash_shares(sizes, world_size):  # what each rank hashes, then gathered
        merged |= {name: hash_file(folder / name) for name in share}
    assert merged == alone


def test_verify_reports_a_damaged_or_missing_file(saved):
    folder = saved[0]
    assert verify_checkpoint(folder) is None
    data = bytearray((folder / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "optimizer.pt").write_bytes(bytes(data))
    assert verify_checkpoint(folder) == "optimizer.pt does not match its recorded sha256"
    (folder / "optimizer.pt").unlink()
    assert verify_checkpoint(folder) == "optimizer.pt is missing or unreadable"
