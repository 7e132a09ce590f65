"""Reading sources: every file type, compression, suffix and layout either gives rows or stops with an
error that names the file (or the key) and the fix, with exit code 2 (a key fixes it) or 1; never an
"internal error". The matrix calls the library; one `sft prepare` per class checks the CLI."""

import bz2
import gzip
import io
import json
import lzma
import os
import sys

import datasets
import pytest

from sft_cli.config import SourceConfig
from sft_cli.data import sources
from sft_cli.data.sources import content_fingerprint, document_rows, load_source, sniff_type, split_suffix
from sft_cli.errors import SFTError

MODEL = "model.name_or_path=builtin:tiny-llama-chatml"


def chat(i, tag="q"):
    return {"messages": [{"role": "user", "content": f"{tag} question {i}?"},
                         {"role": "assistant", "content": f"{tag} answer {i}."}]}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet(rows) -> bytes:
    import pandas as pd

    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer)
    return buffer.getvalue()


CSV = b"prompt,completion\np0,c0\np1,c1\n"
ROWS3 = [chat(i) for i in range(3)]


# ---- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, parts", [
    ("train.jsonl", ("train", ".jsonl", "")), ("train.JSONL.GZ", ("train", ".jsonl", ".gz")),
    ("a.b.csv.zst", ("a.b", ".csv", ".zst")), ("notes.txt", ("notes.txt", "", "")), ("data.xz", ("data", "", ".xz")),
])
def test_split_suffix(name, parts):
    assert split_suffix(name) == parts


@pytest.mark.parametrize("head, kind", [
    (b"", "jsonl"), (b" \n\n", "jsonl"), (b"PAR1\x15\x04", "parquet"), (b"[{\"a\": 1}]", "json"),
    (b'{"a": 1}\n{"a": 2}\n', "jsonl"), (b'\xef\xbb\xbf{"a": 1}\n\n  {"a": 2}', "jsonl"),
    (b'{\n  "data": [\n    {"a": 1}\n  ]\n}\n', "json"),  # one object over several lines
    (b'{"data": [{"a": 1}]}\n', "json"),  # one line: one object, maybe a wrapper
    (b"hello,world\n", None), (b"\x00\x01", None),
])
def test_sniff_type(head, kind):
    assert sniff_type(head) == kind


@pytest.mark.parametrize("doc, columns, rows, prefix", [
    ([chat(0), chat(1)], {}, [chat(0), chat(1)], ""),
    (chat(0), {}, [chat(0)], ""),  # one object is one row, not a list of message rows
    ({"prompt": "p", "completion": "c"}, {}, [{"prompt": "p", "completion": "c"}], ""),
    ({"version": 2, "data": [chat(0)]}, {}, [chat(0)], ":data"),  # wrapper with metadata beside it
    ({"train": [chat(0)], "test": [chat(1)]}, {}, [chat(0)], ":train"),  # several lists: hub_split picks
    ({"dialog": chat(0)["messages"]}, {"messages": "dialog"}, [{"dialog": chat(0)["messages"]}], ""),
    ({"rows": []}, {}, [], ":rows"),
    ({"title": "no rows here"}, {}, [{"title": "no rows here"}], ""),  # one (bad) row: formats says why
    (42, {}, [42], ""),
])
def test_document_rows(doc, columns, rows, prefix):
    assert document_rows(doc, "f.json", columns, "train", "data.sources[0]") == (rows, prefix)


@pytest.mark.parametrize("doc, key", [
    ({"a": [chat(0)], "b": [chat(1)]}, "data.sources[0].hub_split"),
    ({"conversation": chat(0)["messages"]}, "data.sources[0].columns"),
])
def test_document_rows_refuses_what_it_cannot_tell(doc, key):
    with pytest.raises(SFTError) as info:
        document_rows(doc, "f.json", {}, "train", "data.sources[0]")
    assert info.value.exit_code == 2 and info.value.key == key and "f.json" in str(info.value)


# ---- the matrix: every kind of source through the library ---------------------------------------


def _dict_on_disk(path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS3[:2])}).save_to_disk(str(path))


# name -> (files {relative path: bytes | callable(path)}, source fields, expected rows | (exit code, words))
CASES = {
    "jsonl": ({"d.jsonl": jsonl(ROWS3)}, {}, 3),
    "ndjson": ({"d.ndjson": jsonl(ROWS3)}, {}, 3),
    "json list": ({"d.json": json.dumps(ROWS3).encode()}, {}, 3),
    "json one object": ({"d.json": json.dumps(chat(0), indent=2).encode()}, {}, 1),
    "json wrapper": ({"d.json": json.dumps({"version": 1, "data": ROWS3}).encode()}, {}, 3),
    "json wrapper, hub_split": ({"d.json": json.dumps({"train": ROWS3, "test": ROWS3[:1]}).encode()},
                                {"hub_split": "test"}, 1),
    "json several lists": ({"d.json": json.dumps({"a": ROWS3, "b": ROWS3}).encode()}, {},
                           (2, ["data.sources[0].hub_split", "d.json"])),
    "json one conversation": ({"d.json": json.dumps({"conversation": chat(0)["messages"]}).encode()}, {},
                              (2, ["data.sources[0].columns", "d.json", "messages: conversation"])),
    "jsonl.gz": ({"d.jsonl.gz": gzip.compress(jsonl(ROWS3))}, {}, 3),
    "jsonl.bz2": ({"d.jsonl.bz2": bz2.compress(jsonl(ROWS3))}, {}, 3),
    "jsonl.xz": ({"d.jsonl.xz": lzma.compress(jsonl(ROWS3))}, {}, 3),
    "json.gz": ({"d.json.gz": gzip.compress(json.dumps(ROWS3).encode())}, {}, 3),
    "csv": ({"d.csv": CSV}, {}, 2),
    "csv.gz": ({"d.csv.gz": gzip.compress(CSV)}, {}, 2),
    "parquet": ({"d.parquet": parquet(ROWS3)}, {}, 3),
    "parquet.xz": ({"d.parquet.xz": lzma.compress(parquet(ROWS3))}, {}, 3),
    ".txt sniffed as jsonl": ({"d.txt": jsonl(ROWS3)}, {}, 3),
    "no suffix sniffed as json": ({"data": json.dumps(ROWS3, indent=1).encode()}, {}, 3),
    ".dat sniffed as parquet": ({"d.dat": parquet(ROWS3)}, {}, 3),
    ".txt.gz sniffed": ({"d.txt.gz": gzip.compress(jsonl(ROWS3))}, {}, 3),
    "type: csv on .tsv": ({"d.tsv": CSV}, {"type": "csv"}, 2),
    "type: jsonl on garbage": ({"d.log": b"not json\n"}, {"type": "jsonl"}, 1),  # one row, rejected later
    "unknown type": ({"d.tsv": b"a\tb\n1\t2\n"}, {}, (2, ["data.sources[0].type", "d.tsv", "jsonl, json"])),
    "empty jsonl": ({"d.jsonl": b""}, {}, (1, ["zero valid rows", "d.jsonl"])),
    "blank lines": ({"d.jsonl": b"\n   \n\n"}, {}, (1, ["zero valid rows", "d.jsonl"])),
    "empty json": ({"d.json": b"  \n"}, {}, (1, ["zero valid rows", "d.json"])),
    "empty json list": ({"d.json": b"[]"}, {}, (1, ["zero valid rows", "d.json"])),
    "empty csv": ({"d.csv": b""}, {}, (1, ["zero valid rows", "d.csv"])),
    "csv header only": ({"d.csv": b"prompt,completion\n"}, {}, (1, ["zero valid rows", "d.csv"])),
    "parquet without rows": ({"d.parquet": parquet({"text": []})}, {}, (1, ["zero valid rows", "d.parquet"])),
    "empty gz": ({"d.jsonl.gz": gzip.compress(b"")}, {}, (1, ["zero valid rows", "d.jsonl.gz"])),
    "csv with a bad row": ({"d.csv": b"a,b\n1,2\n3,4,5,6\n"}, {}, (1, ["cannot read", "d.csv", "line 3"])),
    "corrupt parquet": ({"d.parquet": b"PAR1 not really PAR1"}, {}, (1, ["cannot read", "d.parquet"])),
    "truncated gz": ({"d.jsonl.gz": gzip.compress(jsonl(ROWS3 * 50))[:-20]}, {}, (1, ["cannot read", "d.jsonl.gz"])),
    "gz that is not gzip": ({"d.jsonl.gz": jsonl(ROWS3)}, {}, (1, ["cannot read", "d.jsonl.gz"])),
    "corrupt xz": ({"d.json.xz": b"\xfd7zXZ\x00garbage"}, {}, (1, ["cannot read", "d.json.xz"])),
    "corrupt bz2": ({"d.csv.bz2": b"BZh9garbage"}, {}, (1, ["cannot read", "d.csv.bz2"])),
    "folder named like a file": ({"x.jsonl/a.jsonl": jsonl(ROWS3)}, {"path": "x.jsonl"}, 3),
    "empty folder named like a file": ({"x.jsonl/notes.md": b"hi"}, {"path": "x.jsonl"},
                                       (2, ["data.sources[0].path", "x.jsonl"])),
    "mixed folder": ({"m/a.jsonl": jsonl(ROWS3), "m/b.csv.gz": gzip.compress(CSV), "m/c.parquet": parquet(ROWS3),
                      "m/README.md": b"# not data"}, {"path": "m"}, 8),
    "glob over unknown suffixes": ({"g/a.txt": jsonl(ROWS3), "g/b.txt": json.dumps(ROWS3).encode()},
                                   {"path": "g/*.txt"}, 6),
    "glob matching nothing": ({}, {"path": "g/*.jsonl"}, (2, ["data.sources[0].path", "matches no files"])),
    "missing file": ({}, {"path": "nope.jsonl.gz"}, (2, ["data.sources[0].path", "nope.jsonl.gz"])),
    "glob characters in an existing name": ({"x[1].jsonl": jsonl(ROWS3)}, {"path": "x[1].jsonl"}, 3),
    "commas, spaces, brackets, unicode": ({"a, b [ü]=1/d, e.csv": CSV}, {"path": "a, b [ü]=1/d, e.csv"}, 2),
    "save_to_disk dataset": ({"disk": lambda p: datasets.Dataset.from_list(ROWS3).save_to_disk(str(p))},
                             {"path": "disk"}, 3),
    "save_to_disk dict, hub_split": ({"disk": _dict_on_disk}, {"path": "disk", "hub_split": "test"}, 2),
    "save_to_disk dict, missing split": ({"disk": _dict_on_disk}, {"path": "disk"},
                                         (2, ["data.sources[0].hub_split", "test"])),
    "broken save_to_disk folder": ({"disk/state.json": b"{", "disk/x.arrow": b"junk"}, {"path": "disk"},
                                   (1, ["cannot read", "disk"])),
    "fifo": ({"p.jsonl": lambda p: os.mkfifo(p)}, {"path": "p.jsonl"}, (2, ["data.sources[0].path", "p.jsonl"])),
}


def _write(root, files) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        content(path) if callable(content) else path.write_bytes(content)


def _read(src: SourceConfig, tmp_path):
    """What prepare does with a source: fingerprint it, then read it."""
    content_fingerprint(src, 0)
    return load_source(src, 0, tmp_path / "work")


@pytest.mark.parametrize("case", list(CASES))
def test_no_source_reaches_the_user_as_an_internal_error(case, tmp_path, monkeypatch):
    files, fields, expected = CASES[case]
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, files)
    src = SourceConfig(**{"path": next(iter(files), ""), **fields})
    if isinstance(expected, int):
        assert len(_read(src, tmp_path)) == expected
        return
    code, words = expected
    with pytest.raises(SFTError) as info:  # any other exception is an "internal error" for the user
        _read(src, tmp_path)
    assert info.value.exit_code == code and "fix" in str(info.value).lower(), str(info.value)
    for word in words:
        assert word in str(info.value)


def test_compressed_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n\n{"text": "b"}\n{broken\n'))
    ds = load_source(SourceConfig(path=str(path)), 0, tmp_path / "work")
    assert ds["location"] == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_zstd_needs_the_zstandard_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if it were not installed
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd anything")
    with pytest.raises(SFTError) as info:
        load_source(SourceConfig(path=str(path)), 0, tmp_path / "work")
    assert info.value.exit_code == 1 and str(path) in str(info.value) and "pip install zstandard" in str(info.value)


def test_zstd_reads_when_zstandard_is_installed(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(ROWS3)))
    assert load_source(SourceConfig(path=str(path)), 0, tmp_path / "work")["location"][2] == f"{path}:3"


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(ROWS3))

    def denied(name, mode="rb"):  # tests run as root, where chmod 000 does not stop a read
        raise PermissionError(13, "Permission denied", str(name))

    monkeypatch.setitem(sources._OPENERS, "", denied)
    with pytest.raises(SFTError) as info:
        load_source(SourceConfig(path=str(path)), 0, tmp_path / "work")
    assert info.value.exit_code == 1 and "Permission denied" in str(info.value) and str(path) in str(info.value)


# ---- through the CLI: one prepare per class -------------------------------------------------------


def test_every_kind_of_file_prepares_through_the_cli(tmp_path, sft):
    weird = tmp_path / "dätä, [1] =x"  # a folder name Hydra's grammar would otherwise split and choke on
    files = {
        "one.json": json.dumps(chat(0, "one"), indent=2).encode(),
        "wrapped.json": json.dumps({"version": 1, "data": [chat(i, "wrapped") for i in range(3)]}).encode(),
        "splits.json": json.dumps({"train": [chat(i, "train") for i in range(2)], "test": [chat(9, "t")]}).encode(),
        "d.jsonl.gz": gzip.compress(jsonl([chat(0, "gz")]) + b"{broken\n" + jsonl([chat(i, "gz") for i in (1, 2)])),
        "e.json.bz2": bz2.compress(json.dumps([chat(i, "bz2") for i in range(2)]).encode()),
        "f.csv.xz": lzma.compress(CSV),
        "g.txt": jsonl([chat(i, "txt") for i in range(2)]),
        "h.log": jsonl([chat(i, "log") for i in range(2)]),
        "i.parquet.gz": gzip.compress(parquet([chat(i, "parquet") for i in range(2)])),
    }
    _write(tmp_path, files)
    _write(weird, {"k.jsonl": jsonl([chat(i, "weird") for i in range(2)])})
    entries = [f"{{path: {tmp_path / name}}}" for name in files if name != "h.log"]
    entries += [f"{{path: {tmp_path / 'h.log'}, type: jsonl}}", f"{{path: {weird / 'k.jsonl'}}}"]
    result = sft("prepare", MODEL, f"data.sources=[{', '.join(entries)}]", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "prepared" / "report.json").read_text())
    kept = {name: s["kept"] for name, s in report["sources"].items()}
    assert kept == {"one": 1, "wrapped": 3, "splits": 2, "d": 3, "e": 2, "f": 2, "g.txt": 2, "h.log": 2, "i": 2,
                    "k": 2}
    rejected = (tmp_path / "run" / "prepared" / "rejected.jsonl").read_text()
    assert f"{tmp_path / 'd.jsonl.gz'}:2" in rejected  # the decompressed line number


@pytest.mark.parametrize("name, content, code, words", [
    ("mystery.bin", b"\x00\x01 binary", 2, ["data.sources[0].type", "mystery.bin", "jsonl"]),
    ("blank.jsonl", b"\n  \n", 1, ["zero valid rows", "blank.jsonl", "data.sources[0].path"]),
    ("conversation.json", json.dumps({"conversation": chat(0)["messages"]}).encode(), 2,
     ["data.sources[0].columns", "conversation.json", "messages: conversation"]),
])
def test_unreadable_sources_name_the_file_and_the_fix(name, content, code, words, tmp_path, sft):
    (tmp_path / name).write_bytes(content)
    result = sft("prepare", MODEL, f"data.sources=[{{path: {tmp_path / name}}}]", f"run_dir={tmp_path / 'run'}")
    stderr = " ".join(result.stderr.split())  # undo rich's line wrapping
    assert result.returncode == code, result.stderr[-2000:]
    assert "internal error" not in stderr and "Traceback" not in stderr
    for word in words:
        assert word in stderr
