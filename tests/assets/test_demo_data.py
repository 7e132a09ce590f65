"""The shipped demo data files (built by tools/build_demo_data.py) are well formed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[2] / "sft_cli" / "assets" / "data"

# Pinned: a rebuild that changes these is a change to review (new upstream version, parser change).
EXPECTED_ROWS = {
    "mmlu_cot.jsonl": 281,
    "humaneval.jsonl": 164,
    "smalltalk.jsonl": 898,
    "general_text.jsonl": 293,
}
EXPECTED_KEYS = {
    "mmlu_cot.jsonl": {"messages", "subject"},
    "humaneval.jsonl": {"prompt", "completion", "task_id", "test", "entry_point"},
    "smalltalk.jsonl": {"conversations", "category"},
    "general_text.jsonl": {"text"},
}


def read_rows(name: str) -> list[dict]:
    raw = (DATA_DIR / name).read_bytes()
    text = raw.decode("utf-8")  # strict: fails on invalid UTF-8
    assert text.endswith("\n") and "\r" not in text
    return [json.loads(line) for line in text.split("\n")[:-1]]


def is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_file_shape(name):
    path = DATA_DIR / name
    assert path.stat().st_size < 2 * 1024 * 1024
    rows = read_rows(name)
    assert len(rows) == EXPECTED_ROWS[name]
    assert all(set(row) == EXPECTED_KEYS[name] for row in rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(set(lines)) == len(lines), "duplicate rows"
    # Written by the builder with sorted keys, so a rebuild diff only shows real changes.
    assert all(line == json.dumps(json.loads(line), ensure_ascii=False, sort_keys=True) for line in lines)


def test_mmlu_cot_messages():
    rows = read_rows("mmlu_cot.jsonl")
    assert len({row["subject"] for row in rows}) == 57
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert is_text(user["content"]) and is_text(assistant["content"]) and is_text(row["subject"])
        assert "(A)" in user["content"] and not user["content"].startswith("Q:")
        assert assistant["content"].startswith("Let's think step by step.")
        assert re.search(r"The answer is \([A-J]\)\.$", assistant["content"])
        # The builder repairs LaTeX escapes that the source turned into control characters.
        assert not re.search(r"[\x00-\x09\x0b-\x1f]", user["content"] + assistant["content"])


def test_humaneval_prompt_plus_completion_is_python():
    rows = read_rows("humaneval.jsonl")
    assert [row["task_id"] for row in rows] == [f"HumanEval/{i}" for i in range(164)]
    for row in rows:
        assert is_text(row["prompt"]) and is_text(row["completion"])
        compile(row["prompt"] + row["completion"], row["task_id"], "exec")


def test_smalltalk_alternates_and_ends_with_gpt():
    rows = read_rows("smalltalk.jsonl")
    for row in rows:
        turns = row["conversations"]
        assert is_text(row["category"])
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(set(t) == {"from", "value"} and is_text(t["value"]) for t in turns)
        assert all(t["value"] == t["value"].strip() for t in turns)


def test_general_text_is_prose():
    rows = read_rows("general_text.jsonl")
    for row in rows:
        assert is_text(row["text"]) and row["text"] == row["text"].strip() and "\n" not in row["text"]
        assert len(row["text"].split()) >= 40


def test_attribution_covers_every_file():
    attribution = (DATA_DIR / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for name, count in EXPECTED_ROWS.items():
        assert f"## {name} ({count} rows)" in attribution
    for license_name in ("MIT", "BSD-3-Clause", "LGPL-2.1"):
        assert license_name in attribution
