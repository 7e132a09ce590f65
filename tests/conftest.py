"""Shared fixtures: tiny tokenizers/models built once per machine (cached), tiny data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Before sft_cli.console builds its consoles: in-process runs print as wide as subprocess ones.
os.environ.setdefault("COLUMNS", "200")


@pytest.fixture(scope="session")
def tiny_dir():
    """tiny_dir(template="chatml", arch="llama") -> folder with a tiny model + tokenizer."""
    from sft_cli.assets.tiny import tiny_model_dir

    return lambda template="chatml", arch="llama": tiny_model_dir(template=template, arch=arch)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    cache = {}

    def load(template="chatml"):
        if template not in cache:
            cache[template] = AutoTokenizer.from_pretrained(str(tiny_dir(template)))
        return cache[template]

    return load


WORDS = ["alpha", "beta", "gamma", "delta", "time", "model", "train", "loss", "token", "value"]


def write_chat_jsonl(path: Path, rows: int = 120, max_words: int = 40, seed: int = 0) -> Path:
    """A seeded file of one-turn chats ("Say something i" -> 5..max_words random words): the training
    tests' data. Losses pinned in tests depend on it, so its output must never change."""
    import numpy as np

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(rows):
            reply = " ".join(rng.choice(WORDS, size=int(rng.integers(5, max_words))))
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"Say something {i}"},
                                                  {"role": "assistant", "content": reply}]}) + "\n")
    return path


TINY_MODEL = "builtin:tiny-llama-chatml"


def train_args(data: Path, run_dir: Path, *overrides: str, eval_fraction: float = 0.1, max_seq_len: int = 256,
               model: str = TINY_MODEL, verb: str | None = "train") -> list[str]:
    """The command line of the tests that train the tiny model on one data file:

        train_args(data, run_dir, "trainer.max_steps=8")
        # ["train", "model.name_or_path=builtin:tiny-llama-chatml", "data.sources=[{path: DATA}]",
        #  "data.eval_fraction=0.1", "max_seq_len=256", "run_dir=RUN_DIR", "trainer.max_steps=8"]

    verb=None leaves the verb out (for `sft prepare/pack/train` with the same overrides). Losses
    pinned in tests depend on every override, so each test file passes its own steps, batch and lr."""
    return [*([verb] if verb else []), f"model.name_or_path={model}", f"data.sources=[{{path: {data}}}]",
            f"data.eval_fraction={eval_fraction}", f"max_seq_len={max_seq_len}", f"run_dir={run_dir}", *overrides]


def _write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped as JSON) or raw bytes/str lines (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for row in rows:
            if isinstance(row, bytes):
                handle.write(row.rstrip(b"\n") + b"\n")
            elif isinstance(row, str):
                handle.write(row.rstrip("\n").encode() + b"\n")
            else:
                handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    return path


def _run_sft(*args: str, cwd: Path | None = None, timeout: int = 600, isolated: bool = False
             ) -> subprocess.CompletedProcess:
    """`sft ARGS` -> CompletedProcess(returncode, stdout, stderr).

    In this process (cli.main, as the console script calls it; ~5 s of imports saved per call), unless
    the call needs a process of its own: isolated=True (signals, console-script checks), an armed
    kill (SFT_FAULT_KILL_*: it SIGKILLs its process) or several workers (torchrun)."""
    if isolated or _needs_own_process(args):
        env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
        return subprocess.run([sys.executable, "-m", "sft_cli", *args], cwd=cwd or REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return _run_in_process(list(args), cwd or REPO)


def _needs_own_process(args) -> bool:
    if any(key.startswith("SFT_FAULT_KILL") for key in os.environ):
        return True
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("trainer.nproc", "trainer.nnodes") and value.strip() not in ("1", "'1'"):
            return True
    return False


def _run_in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """cli.main(args) with stdout/stderr captured and the process-wide state a run changes put back:
    environment, working directory, signal handlers, warning filters, torch's RNG, thread count and
    deterministic mode (cli.main itself resets sys.argv and Hydra's global state)."""
    import contextlib
    import io
    import signal
    import warnings

    import torch

    from sft_cli import cli

    out, err = io.StringIO(), io.StringIO()
    env, here = dict(os.environ), os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    torch_state = (torch.get_rng_state(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled())
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            try:
                cli.main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_rng_state(torch_state[0])
        torch.set_num_threads(torch_state[1])
        torch.use_deterministic_algorithms(torch_state[2], warn_only=torch_state[3])
    return subprocess.CompletedProcess(["sft", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def write_jsonl():
    return _write_jsonl


@pytest.fixture
def sft():
    """sft("prepare", "key=value", ...) -> CompletedProcess of `python -m sft_cli ...`."""
    return _run_sft


# -- one LoRA run the evaluate, merge, pipeline and pinned-loss tests share --------------------------

def _text_jsonl(path: Path, rows: int = 40, words: int = 30, seed: int = 1) -> Path:
    """Plain-text rows (format: text) of random WORDS: a second source, so scores come per source."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=words))}) + "\n")
    return path


def lora_run_args(root: Path, *overrides: str) -> list[str]:
    """The shared run's overrides (no verb): the tiny llama, a chat and a text source, LoRA, 6 steps
    of 2 x 2 micro-batches with a checkpoint every 2 steps and an eval every 3."""
    chat = write_chat_jsonl(root / "chat.jsonl", rows=100, max_words=30)
    text = _text_jsonl(root / "text.jsonl")
    return [f"model.name_or_path={TINY_MODEL}", f"data.sources=[{{path: {chat}}}, {{path: {text}, format: text}}]",
            "data.eval_fraction=0.2", "max_seq_len=256", f"run_dir={root / 'run'}", "trainer.micro_batch_size=2",
            "trainer.grad_accum=2", "trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_every=3",
            "trainer.log_every=1", "optim.lr=3e-3", *overrides]


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory) -> Path:
    """A finished LoRA run, built verb by verb through the CLI (prepare, pack, train). Read-only:
    a test that writes into a run takes `lora_run_copy`."""
    root = tmp_path_factory.mktemp("lora-run")
    for verb in ("prepare", "pack", "train"):
        result = _run_sft(verb, *lora_run_args(root))
        assert result.returncode == 0, (verb, result.stderr[-3000:])
    return root / "run"


@pytest.fixture
def lora_run_copy(lora_run, tmp_path) -> Path:
    """A copy of the shared run to write into (eval/, merged/): pass run_dir=<copy> to each verb."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    return copy
