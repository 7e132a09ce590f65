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
    assert "sft pack ->" not in again.stdout  # one line, not the whole table again


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


# -- packed/ pinned bit for bit ---------------------------------------------------------------------

def _prepared_like_split(folder, n: int = 600, batch_rows: int = 128) -> datasets.Dataset:
    """A seeded split shaped like prepared/'s (input_ids, labels masked over a prompt, num_tokens): an
    Arrow file of several record batches in `folder`, mapped as load_from_disk maps it."""
    import pyarrow as pa

    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 200, size=n)
    batches = []
    for lo in range(0, n, batch_rows):
        length = lengths[lo:lo + batch_rows]
        offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)
        ids = rng.integers(0, 1000, int(offsets[-1]), dtype=np.int32)
        labels = np.where(rng.random(len(ids)) < 0.3, -100, ids).astype(np.int32)
        batches.append(pa.record_batch({
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
            "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
            "num_tokens": pa.array(length.astype(np.int32))}))
    path = str(folder / "split.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return datasets.Dataset.from_file(path)


def _digests(dataset: datasets.Dataset, report: dict) -> dict[str, str]:
    """sha256 of each column's type, row offsets (from 0) and flat values (the rows, bit for bit), and
    of the report."""
    import hashlib

    digests = {"report": hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()[:16]}
    for name in dataset.column_names:
        column = dataset.data.column(name).combine_chunks()
        offsets = column.offsets.to_numpy().astype(np.int64)
        values = column.values.to_numpy()[offsets[0]:offsets[-1]]
        digest = hashlib.sha256(str(column.type).encode())
        digest.update((offsets - offsets[0]).tobytes())
        digest.update(np.ascontiguousarray(values).tobytes())
        digests[name] = digest.hexdigest()[:16]
    return digests


def _pack(split: datasets.Dataset, strategy: str, folder) -> tuple[datasets.Dataset, dict]:
    from sft_cli.pack import pack_split

    report = pack_split(split, strategy, 256, 3, folder / "packed", "test")
    return datasets.load_from_disk(str(folder / "packed")), report


# Digests of the packing written before `sft pack` was vectorised (commit 45037d9): it must not change.
PINNED = {
    "bfd": {"report": "8d129b06a1aa1b76", "input_ids": "9dbf95106b642437", "labels": "16e03643459cb7a2",
            "position_ids": "39d21faa5996eb99", "seq_lens": "066082e7d31e31b6", "example_ids": "6d812f68cc28b544"},
    "wrapped": {"report": "62937fd0913e0d01", "input_ids": "d46fde4c88dd739a", "labels": "5575672510bf49de",
                "position_ids": "749dc50888096d5d", "seq_lens": "8c33e43db8d4c10b", "example_ids": "c225a2c5cfdd8127"},
    "none": {"report": "d2832950be7edea8", "input_ids": "d364da3e0680b8aa", "labels": "074623cc7ef9a645",
             "position_ids": "b2b007c8ce7e6d54", "seq_lens": "fbb89c3a118ce5c5", "example_ids": "c8d818d4d9ed8f3d"},
}


@pytest.mark.parametrize("rows_per_block", [37, 4096])  # several record batches or one: the same rows
@pytest.mark.parametrize("strategy", list(PINNED))
def test_packed_rows_are_pinned_bit_for_bit(tmp_path, monkeypatch, strategy, rows_per_block):
    monkeypatch.setattr("sft_cli.pack.TOKENS_PER_BLOCK", rows_per_block * 256)
    packed, report = _pack(_prepared_like_split(tmp_path), strategy, tmp_path)
    assert packed.column_names == ["input_ids", "labels", "position_ids", "seq_lens", "example_ids"]
    assert [str(f.type) for f in packed.data.schema] == ["list<item: int32>"] * 4 + ["list<item: int64>"]
    assert _digests(packed, report) == PINNED[strategy]


def test_a_selected_view_packs_its_own_rows(tmp_path):
    split = _prepared_like_split(tmp_path)
    view = split.select(np.random.default_rng(0).permutation(len(split))[:100])  # an _indices mapping
    packed, report = _pack(view, "none", tmp_path)
    assert packed["input_ids"] == view["input_ids"] and report["examples"] == 100


def test_a_split_that_is_not_its_files_is_refused(tmp_path):
    from sft_cli.pack import pack_split

    in_memory = datasets.Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]], "num_tokens": [2]})
    with pytest.raises(ValueError, match="load_from_disk"):
        pack_split(in_memory, "bfd", 8, 0, tmp_path, "test")
