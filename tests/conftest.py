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


def _run_sft(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real entry point, as a user runs it."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "sft_cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def write_jsonl():
    return _write_jsonl


@pytest.fixture
def sft():
    """sft("prepare", "key=value", ...) -> CompletedProcess of `python -m sft_cli ...`."""
    return _run_sft
