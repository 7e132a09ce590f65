"""`sft pack` end to end: every prepared example lands exactly once, unchanged."""

import json

import datasets
import numpy as np
import pytest

MODEL = "model.name_or_path=builtin:tiny-llama-chatml"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    with open(path, "w") as handle:
        for i in range(300):
            words = " ".join(["word"] * int(rng.integers(1, 60)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"Q{i}: {words[:40]}"},
                                                  {"role": "assistant", "content": f"A{i} {words}"}]}) + "\n")
    return path


@pytest.mark.parametrize("strategy", ["bfd", "wrapped", "none"])
def test_every_example_exactly_once_unchanged(tmp_path, data_file, sft, strategy):
    args = ["pack", MODEL, f"data.sources=[{{path: {data_file}}}]", "data.eval_fraction=0.1", "max_seq_len=256",
            f"pack.strategy={strategy}", f"run_dir={tmp_path}"]
    result = sft(*args)
    assert result.returncode == 0, result.stderr
    prepared = datasets.load_from_disk(str(tmp_path / "prepared"))
    packed = datasets.load_from_disk(str(tmp_path / "packed"))
    report = json.loads((tmp_path / "packed" / "report.json").read_text())
    for split in ("train", "eval"):
        pieces = {}
        for row in packed[split]:
            assert sum(row["seq_lens"]) == len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
            assert len(row["input_ids"]) <= 256
            offset = 0
            for example, n in zip(row["example_ids"], row["seq_lens"]):
                assert row["position_ids"][offset:offset + n] == list(range(n))
                assert row["labels"][offset] == -100  # boundary: never predicted from the previous example
                pieces.setdefault(example, []).append((row["input_ids"][offset:offset + n],
                                                       row["labels"][offset:offset + n]))
                offset += n
        assert sorted(pieces) == list(range(len(prepared[split])))
        for example, parts in pieces.items():
            ids = [t for p, _ in parts for t in p]
            labels = [t for _, lab in parts for t in lab]
            assert ids == prepared[split][example]["input_ids"]
            if strategy != "wrapped":  # wrapped cuts examples: the cut loses one label per piece
                assert len(parts) == 1 and labels == prepared[split][example]["labels"]
        stats = report["splits"][split]
        assert stats["examples"] == len(prepared[split]) and stats["rows"] == len(packed[split])
        assert stats["real_tokens"] == sum(prepared[split]["num_tokens"])
    if strategy == "bfd":
        assert report["splits"]["train"]["efficiency"] > 0.9
        assert report["splits"]["train"]["examples_split"] == 0
        assert report["splits"]["train"]["loss_tokens"] == sum(prepared["train"]["num_loss_tokens"])
    again = sft(*args)
    assert again.returncode == 0 and "packed/ is up to date" in again.stderr


def test_pack_runs_prepare_when_missing_and_refreshes_on_change(tmp_path, data_file, sft):
    args = ["pack", MODEL, f"data.sources=[{{path: {data_file}}}]", f"run_dir={tmp_path}", "max_seq_len=256"]
    assert sft(*args).returncode == 0
    assert (tmp_path / "prepared" / "manifest.json").exists()
    rows_before = json.loads((tmp_path / "packed" / "report.json").read_text())["splits"]["train"]["rows"]
    changed = sft(*args[:-1], "max_seq_len=512")
    assert changed.returncode == 0 and "up to date" not in changed.stderr
    assert json.loads((tmp_path / "packed" / "report.json").read_text())["splits"]["train"]["rows"] < rows_before


def test_unknown_strategy_is_a_config_error(tmp_path, data_file, sft):
    result = sft("pack", MODEL, f"data.sources=[{{path: {data_file}}}]", f"run_dir={tmp_path}", "pack.strategy=ffd")
    assert result.returncode == 2 and "pack.strategy" in result.stderr
