"""Read raw rows from a data source without interpreting them.

Every source becomes an Arrow-backed `datasets.Dataset` with four string columns:
`source` (its name), `location` (file:line or file:row, for error messages), `raw`
(the row as JSON text) and `error` (set when the row could not even be read, e.g.
invalid UTF-8). Parsing and validation happen later, in parallel (see formats.py).
Rows stream through a generator into Arrow, so 1M rows never sit in Python lists.

    ds = load_source(SourceConfig(path="data/*.jsonl"), index=0, workdir=Path("/tmp/x"))
    ds[0]  # {'source': 'a.jsonl', 'location': 'data/a.jsonl:1', 'raw': '{"messages": ...}', 'error': None}
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import datasets

from sft_cli.artifacts import hash_file
from sft_cli.config import SourceConfig
from sft_cli.errors import ConfigError, SFTError

# A row is one JSON line; one bigger than this is rejected (`row_too_large`) without being held in
# memory whole: no SFT example is 32 MiB, and Arrow string columns cap at 2 GiB per batch.
MAX_ROW_BYTES = 32 << 20
FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FEATURES = datasets.Features(
    {name: datasets.Value("string") for name in ("source", "location", "raw", "error")}
)


def source_name(src: SourceConfig, index: int) -> str:
    if src.name:
        return src.name
    stem = Path(src.path.rstrip("/")).name
    for suffix in FILE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem.replace("*", "all") or f"source{index}"


def resolve_files(src: SourceConfig, index: int) -> tuple[str, list[Path]]:
    """Classify `src.path`: ('files', [...]) | ('disk', [folder]) | ('hub', [])."""
    path = src.path
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"data.sources[{index}].path", f"the glob '{path}' matches no files",
                              "check the pattern (quote it in the shell)")
        return "files", files
    local = Path(path)
    if local.is_dir():
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists() \
                or (local / "state.json").exists():
            return "disk", [local]
        files = sorted(p for p in local.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"data.sources[{index}].path", f"folder '{path}' has no .jsonl/.json/.parquet/.csv files",
                              "point at a file, a glob, or a datasets.save_to_disk folder")
        return "files", files
    if local.is_file():
        return "files", [local]
    if local.suffix in FILE_SUFFIXES or path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        raise ConfigError(f"data.sources[{index}].path", f"file not found: {path}",
                          "fix the path (relative paths are from the current directory)")
    return "hub", []


def content_fingerprint(src: SourceConfig, index: int) -> dict:
    """What identifies a source's content for the prepare cache."""
    kind, paths = resolve_files(src, index)
    if kind == "hub":
        return {"hub": src.path, "split": src.hub_split}
    if kind == "disk":
        files = sorted(p for p in paths[0].rglob("*") if p.is_file())
        return {"disk": {str(p.relative_to(paths[0])): hash_file(p) for p in files}}
    return {"files": {str(p): hash_file(p) for p in paths}}


def _lines(handle, max_bytes: int = MAX_ROW_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a binary file; None for a line over `max_bytes`, read past in
    bounded pieces so a 10 GB line never sits in memory."""
    line_no = 0
    while True:
        line = handle.readline(max_bytes + 1)
        if not line:
            return
        line_no += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = handle.readline(1 << 20)
            yield line_no, None
        else:
            yield line_no, line


def _dumps(row) -> str:
    """A parsed row back to JSON text; escaped when it holds lone surrogates (Arrow needs UTF-8)."""
    text = json.dumps(row, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(row)
    return text


def _jsonl_rows(paths: list[str], name: str) -> Iterator[dict]:
    for path in paths:
        with open(path, "rb") as handle:
            for line_no, line in _lines(handle):
                location = f"{path}:{line_no}"
                if line is None:
                    yield {"source": name, "location": location, "raw": None,
                           "error": f"row_too_large: over {MAX_ROW_BYTES >> 20} MiB"}
                    continue
                if not line.strip():
                    continue  # blank lines hold no row
                try:
                    text = line.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM may open the file
                except UnicodeDecodeError as exc:
                    yield {"source": name, "location": location, "raw": None,
                           "error": f"invalid_utf8: byte {exc.start}"}
                    continue
                yield {"source": name, "location": location, "raw": text, "error": None}


def _json_rows(paths: list[str], name: str) -> Iterator[dict]:
    for path in paths:
        try:
            text = Path(path).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            yield {"source": name, "location": path, "raw": None, "error": f"invalid_utf8: byte {exc.start}"}
            continue
        try:
            doc = json.loads(text)
        except RecursionError:
            yield {"source": name, "location": path, "raw": None, "error": "malformed_json: nested too deeply"}
            continue
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # a .json file that is really JSON lines
                yield from _jsonl_rows([path], name)
            else:
                yield {"source": name, "location": f"{path}:{exc.lineno}", "raw": None,
                       "error": f"malformed_json: {exc.msg}"}
            continue
        if isinstance(doc, dict):  # {"data": [...]} style, or a single row
            lists = [v for v in doc.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            doc = lists[0] if len(doc) == 1 and lists else [doc]
        elif not isinstance(doc, list):  # a bare number or string: one (bad) row, not one per character
            doc = [doc]
        for i, row in enumerate(doc):
            try:
                raw, error = _dumps(row), None
            except RecursionError:
                raw, error = None, "malformed_json: nested too deeply"
            yield {"source": name, "location": f"{path}[{i}]", "raw": raw, "error": error}


def _generate(kind: str, paths: list[str], name: str) -> Iterator[dict]:
    yield from (_jsonl_rows if kind == "jsonl" else _json_rows)(paths, name)


def _from_table(ds: datasets.Dataset, name: str, where: str, first_line: int | None) -> datasets.Dataset:
    """Arrow tables (parquet, csv, hub, save_to_disk) -> raw rows with row locations."""
    def to_raw(batch: dict, indices: list[int]) -> dict:
        keys = list(batch)
        rows = [{k: batch[k][j] for k in keys} for j in range(len(indices))]
        if first_line is None:
            locations = [f"{where}#row{i}" for i in indices]
        else:  # csv: header is line 1 (exact unless fields span lines)
            locations = [f"{where}:{i + first_line}" for i in indices]
        return {"source": [name] * len(rows), "location": locations,
                "raw": [json.dumps(r, ensure_ascii=False, default=str) for r in rows],
                "error": [None] * len(rows)}

    return ds.map(to_raw, batched=True, with_indices=True, remove_columns=ds.column_names,
                  features=FEATURES, desc=f"reading {name}")


def load_source(src: SourceConfig, index: int, workdir: Path) -> datasets.Dataset:
    """All rows of one source as raw rows (see module docstring)."""
    name = source_name(src, index)
    kind, paths = resolve_files(src, index)
    if kind == "hub":
        from sft_cli.assets import go_offline_if_unreachable

        go_offline_if_unreachable()
        try:
            ds = datasets.load_dataset(src.path, split=src.hub_split)
        except Exception as exc:  # offline, gated, or a typo: one clear line either way
            raise SFTError(
                f"cannot load hub dataset '{src.path}' ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). "
                f"Offline? Download it elsewhere and set data.sources[{index}].path to a local "
                ".jsonl/.json/.parquet/.csv file or a datasets.save_to_disk folder."
            ) from None
        return _from_table(ds, name, src.path, None)
    if kind == "disk":
        loaded = datasets.load_from_disk(str(paths[0]))
        if isinstance(loaded, datasets.DatasetDict):
            if src.hub_split not in loaded:
                raise ConfigError(f"data.sources[{index}].hub_split", f"'{src.hub_split}' is not a split of {paths[0]}",
                                  f"use one of: {', '.join(loaded)}")
            loaded = loaded[src.hub_split]
        return _from_table(loaded, name, str(paths[0]), None)

    parts = []
    by_kind: dict[str, list[str]] = {}
    for path in paths:
        by_kind.setdefault(FILE_SUFFIXES[path.suffix], []).append(str(path))
    for file_kind, files in by_kind.items():
        if file_kind in ("jsonl", "json"):
            # A fresh cache_dir per run: from_generator's own cache keys on arguments, not file contents.
            parts.append(datasets.Dataset.from_generator(
                _generate, gen_kwargs={"kind": file_kind, "paths": files, "name": name},
                features=FEATURES, cache_dir=str(workdir / "generator"), keep_in_memory=False))
        else:
            for path in files:
                try:
                    table = datasets.load_dataset(file_kind, data_files=path, split="train",
                                                  cache_dir=str(workdir / "tables"))
                except Exception as exc:
                    raise SFTError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
                parts.append(_from_table(table, name, path, 2 if file_kind == "csv" else None))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def default_num_proc(rows: int, requested: int | None) -> int:
    """Worker processes for a map: spawning costs ~1 s each, so small data stays in-process."""
    if requested:
        return max(1, requested)
    return max(1, min(os.cpu_count() or 1, rows // 5000))
