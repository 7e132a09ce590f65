"""Read raw rows from a data source without interpreting them.

Every source becomes an Arrow-backed `datasets.Dataset` with four string columns:
`source` (its name), `location` (file:line or file:row, for error messages), `raw`
(the row as JSON text) and `error` (set when the row could not even be read, e.g.
invalid UTF-8). Parsing and validation happen later, in parallel (see formats.py).
Rows stream through a generator into Arrow, so 1M rows never sit in Python lists.

A local file's type is the source's `type`, else its suffix (.jsonl/.ndjson, .json, .parquet,
.csv), else its first bytes: PAR1 is parquet, `[` is JSON, `{` is JSON lines when the next line
opens another object (else one JSON document). Any of them may be compressed (.gz .bz2 .xz, and
.zst when the zstandard module is installed); line numbers count decompressed lines. A source
that cannot be read stops with one error naming the file and the fix: a ConfigError (exit 2)
when a config key fixes it (type, hub_split, columns, path), else an SFTError (exit 1).

    ds = load_source(SourceConfig(path="data/*.jsonl"), index=0, workdir=Path("/tmp/x"))
    ds[0]  # {'source': 'a.jsonl', 'location': 'data/a.jsonl:1', 'raw': '{"messages": ...}', 'error': None}
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import pyarrow as pa

from sft_cli.config import SourceConfig
from sft_cli.data.formats import RowError, detect_format
from sft_cli.errors import ConfigError, SFTError
from sft_cli.run_dir import hash_file

# A row is one JSON line; one bigger than this is rejected (`row_too_large`) without being held in
# memory whole: no SFT example is 32 MiB, and Arrow string columns cap at 2 GiB per batch.
MAX_ROW_BYTES = 32 << 20
FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FILE_TYPES = ("jsonl", "json", "parquet", "csv")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
KNOWN_FILES = ".jsonl/.ndjson/.json/.parquet/.csv (optionally .gz/.bz2/.xz/.zst)"
SNIFF_BYTES = 1 << 16  # enough to see the start of a file's second line
DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # written by save_to_disk
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FEATURES = datasets.Features(
    {name: datasets.Value("string") for name in ("source", "location", "raw", "error")}
)


def split_suffix(name: str) -> tuple[str, str, str]:
    """'train.jsonl.gz' -> ('train', '.jsonl', '.gz'): stem, known type suffix, compression ('' if none)."""
    path = Path(name)
    compression = path.suffix.lower() if path.suffix.lower() in COMPRESSIONS else ""
    if compression:
        path = Path(path.stem)
    suffix = path.suffix.lower() if path.suffix.lower() in FILE_SUFFIXES else ""
    return (path.stem if suffix else path.name), suffix, compression


def source_name(src: SourceConfig, index: int) -> str:
    if src.name:
        return src.name
    stem = split_suffix(Path(src.path.rstrip("/")).name)[0]
    return stem.replace("*", "all") or f"source{index}"


# ---- opening files: decompression, and read failures as errors that name the file ----------------


def _open_zstd(path: Path, mode: str = "rb"):
    try:
        import zstandard
    except ImportError:
        raise SFTError(f"cannot read {path}: it is zstd-compressed and the zstandard module is not installed. "
                       f"Fix: pip install zstandard, or decompress it first (zstd -d '{path}')") from None
    return io.BufferedReader(zstandard.open(path, mode))  # its own reader has no readline


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _open_zstd, "": open}


def open_data(path: Path):
    """The file's content as a binary stream, decompressed when its suffix says so."""
    return _OPENERS[split_suffix(path.name)[2]](path, "rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a file raises when the machine or the file is at fault: permissions, a damaged
    or truncated archive (gzip raises OSError or EOFError, xz LZMAError, zlib's inflate zlib.error)."""
    errors = (OSError, EOFError, lzma.LZMAError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


@contextmanager
def _reading(path):
    """A file that cannot be read stops the run with one line naming it (exit 1), never a crash."""
    try:
        yield
    except _read_errors() as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise SFTError(f"cannot read {path}: {reason}. Fix: check that the file is readable (permissions) and "
                       "complete (a compressed file must decompress to its end)") from None


def _head(path: Path) -> bytes:
    """The first SNIFF_BYTES of the file's content, decompressed."""
    with _reading(path), open_data(path) as handle:
        return handle.read(SNIFF_BYTES)


def _root_message(exc: BaseException) -> str:
    """The innermost cause's first line: datasets wraps the reader's own words (`Expected 2 fields in line 3`)."""
    for _ in range(20):  # cause chains are short; the bound only guards against a cycle
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- what a path names: files and their types, a save_to_disk folder, or a hub dataset -----------


def sniff_type(head: bytes) -> str | None:
    """A file's type from its first bytes, or None. Blank is JSON lines (with no rows); `{` is JSON
    lines when the next non-blank line opens another object, else one JSON document (which falls
    back to JSON lines when it turns out to hold several values, see _json_rows)."""
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        return "jsonl"
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{"):
        lines = [line for line in text.split(b"\n", 64) if line.strip()][:2]
        return "jsonl" if len(lines) == 2 and lines[1].lstrip().startswith(b"{") else "json"
    return None


def _declared_type(src: SourceConfig) -> str:
    return str(getattr(src.type, "value", src.type))


def file_type(path: Path, src: SourceConfig, index: int) -> str:
    """jsonl | json | parquet | csv: the source's `type`, else the file's suffix, else its content."""
    declared = _declared_type(src)
    if declared != "auto":
        return declared
    suffix = split_suffix(path.name)[1]
    sniffed = FILE_SUFFIXES[suffix] if suffix else sniff_type(_head(path))
    if sniffed is None:
        raise ConfigError(f"data.sources[{index}].type", f"cannot tell the type of {path}: its name does not end "
                          f"in {KNOWN_FILES} and it does not start like JSON lines, JSON or parquet",
                          f"set data.sources[{index}].type to one of {', '.join(FILE_TYPES)}, or rename the file")
    return sniffed


def resolve_files(src: SourceConfig, index: int) -> tuple[str, list[tuple[Path, str]]]:
    """Classify `src.path`: ('files', [(file, type), ...]) | ('disk', [(folder, 'disk')]) | ('hub', []).

    A path that exists is that file or folder, even when it holds glob characters (`x[1].jsonl`)."""
    key, path = f"data.sources[{index}].path", src.path
    local = Path(path)
    if local.is_dir():
        if any((local / marker).exists() for marker in DISK_MARKERS):
            return "disk", [(local, "disk")]
        files = [p for p in sorted(local.rglob("*")) if split_suffix(p.name)[1] and p.is_file()]
        if not files:
            raise ConfigError(key, f"folder '{path}' has no {KNOWN_FILES} files",
                              f"point at a file, a glob (with data.sources[{index}].type for other names), "
                              "or a datasets.save_to_disk folder")
    elif local.is_file():
        files = [local]
    elif local.exists():
        raise ConfigError(key, f"'{path}' is neither a regular file nor a folder", "point at a data file or folder")
    elif any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(key, f"the glob '{path}' matches no files", "check the pattern (quote it in the shell)")
    elif any(split_suffix(local.name)[1:]) or path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        raise ConfigError(key, f"file not found: {path}", "fix the path (relative paths are from the current directory)")
    else:
        return "hub", []
    return "files", [(p, file_type(p, src, index)) for p in files]


def _hash(path: Path) -> str:
    with _reading(path):
        return hash_file(path)


def content_fingerprint(src: SourceConfig, index: int) -> dict:
    """What identifies a source's content for the prepare cache."""
    kind, paths = resolve_files(src, index)
    if kind == "hub":
        return {"hub": src.path, "split": src.hub_split}
    if kind == "disk":
        folder = paths[0][0]
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return {"disk": {str(p.relative_to(folder)): _hash(p) for p in files}}
    return {"files": {str(p): _hash(p) for p, _ in paths}}


# ---- JSON lines and JSON: our own readers, streamed into Arrow ------------------------------------


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
        with _reading(path), open_data(Path(path)) as handle:
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


def _looks_like_row(doc: dict, columns: dict[str, str]) -> bool:
    try:
        detect_format(doc, columns)
    except RowError:
        return False
    return True


def _looks_like_message(item, columns: dict[str, str]) -> bool:
    """A chat message rather than a row: it has a role (or ShareGPT's `from`)."""
    return isinstance(item, dict) and any(k in item for k in (columns.get("role", "role"), "from"))


def document_rows(doc, path: str, columns: dict[str, str], hub_split: str, key: str) -> tuple[list, str]:
    """The rows of one parsed .json document and the location prefix of each (`file[i]`, `file:data[i]`).

    A list is the rows. One object is one row when it looks like one of a known format (messages,
    conversations, instruction/output, prompt/completion, text; after `columns`); otherwise the rows are
    the one list of objects it wraps (`{"data": [...]}`, with metadata keys beside it), or the `hub_split`
    one of several (`{"train": [...], "test": [...]}`). `key` is the source's config key, for the fix."""
    if isinstance(doc, list):
        return doc, ""
    if not isinstance(doc, dict) or _looks_like_row(doc, columns):
        return [doc], ""  # a bare number or string too: one (bad) row, not one per character
    lists = {name: value for name, value in doc.items() if isinstance(value, list) and (value or len(doc) == 1)
             and all(isinstance(item, dict) for item in value)}
    if len(lists) > 1 and hub_split in lists:
        lists = {hub_split: lists[hub_split]}
    if len(lists) > 1:
        raise ConfigError(f"{key}.hub_split", f"{path} holds one object with several lists of rows "
                          f"({', '.join(lists)}) and none is '{hub_split}'", f"set {key}.hub_split to the one to read")
    if not lists:
        return [doc], ""  # formats.py reports what the row lacks
    (name, rows), = lists.items()
    if rows and _looks_like_message(rows[0], columns):
        raise ConfigError(f"{key}.columns", f"{path} holds one object whose '{name}' is a list of chat messages, "
                          "so it is one conversation, not a list of rows",
                          f"set {key}.columns={{messages: {name}}} to read it as one conversation; for many, "
                          "write one {\"messages\": [...]} object per line (JSON lines) or a list of them")
    return rows, f":{name}"


def _json_rows(paths: list[str], name: str, columns: dict[str, str] | None = None, hub_split: str = "train",
               index: int = 0) -> Iterator[dict]:
    for path in paths:
        with _reading(path), open_data(Path(path)) as handle:
            data = handle.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            yield {"source": name, "location": path, "raw": None, "error": f"invalid_utf8: byte {exc.start}"}
            continue
        if not text.strip():
            continue  # an empty file holds no rows (the source as a whole must have some)
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
        rows, prefix = document_rows(doc, path, columns or {}, hub_split, f"data.sources[{index}]")
        for i, row in enumerate(rows):
            try:
                raw, error = _dumps(row), None
            except RecursionError:
                raw, error = None, "malformed_json: nested too deeply"
            yield {"source": name, "location": f"{path}{prefix}[{i}]", "raw": raw, "error": error}


def _generate(kind: str, paths: list[str], name: str, columns: dict[str, str], hub_split: str,
              index: int) -> Iterator[dict]:
    if kind == "jsonl":
        yield from _jsonl_rows(paths, name)
    else:
        yield from _json_rows(paths, name, columns, hub_split, index)


def _chunks(rows: Iterator[dict], max_rows: int = 10_000, max_bytes: int = 64 << 20) -> Iterator[list[dict]]:
    """Rows in lists of at most `max_rows` rows or about `max_bytes` of raw text (rows may be 32 MiB)."""
    chunk, size = [], 0
    for row in rows:
        chunk.append(row)
        size += len(row["raw"] or "")
        if len(chunk) >= max_rows or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _generated(kind: str, paths: list[Path], name: str, src: SourceConfig, index: int,
               workdir: Path) -> datasets.Dataset | None:
    """JSON lines or JSON files as raw rows, written to an Arrow file chunk by chunk (one Arrow
    conversion per chunk, not per row); None when they hold no rows at all."""
    from datasets.arrow_writer import ArrowWriter

    rows = _generate(kind, [str(p) for p in paths], name, dict(src.columns), src.hub_split, index)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"raw-{index}-{kind}.arrow"
    with ArrowWriter(features=FEATURES, path=str(path)) as writer:
        for chunk in _chunks(rows):
            writer.write_table(pa.Table.from_pylist(chunk, schema=FEATURES.arrow_schema))
        count, _ = writer.finalize()
    return datasets.Dataset.from_file(str(path)) if count else None


# ---- tables: parquet, csv, save_to_disk folders, the hub -------------------------------------------


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


def _plain_copy(path: Path, target: Path) -> Path:
    """`path` under a plain name for datasets' readers, which expand glob characters in file names
    (`x[1].csv`) and pick decoders by suffix: a link, or a decompressed copy for a compressed file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    if split_suffix(path.name)[2]:
        with _reading(path), open_data(path) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    else:
        target.symlink_to(path.resolve())
    return target


def _holds_no_rows(path: Path, kind: str) -> bool:
    """Whether a parquet file, or a csv file, holds no rows (a header alone)."""
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows == 0
        import pandas as pd

        return pd.read_csv(path, nrows=1).empty
    except Exception:  # unreadable: the caller reports datasets' own error
        return False


def _read_table(path: Path, kind: str, n: int, name: str, index: int, workdir: Path) -> datasets.Dataset | None:
    """One parquet or csv file as raw rows (csv rows located by line); None for an empty file."""
    if not _head(path).strip():
        return None
    local = _plain_copy(path, workdir / "files" / f"{n}.{kind}")
    try:
        table = datasets.load_dataset(kind, data_files=str(local), split="train", cache_dir=str(workdir / "tables"))
    except Exception as exc:
        if _holds_no_rows(local, kind):
            return None  # datasets refuses a table without rows
        raise SFTError(f"cannot read {path} as {kind}: {_root_message(exc)}. Fix: repair or re-export the file, "
                       f"or set data.sources[{index}].type if it is not {kind}") from None
    return _from_table(table, name, str(path), 2 if kind == "csv" else None)


def _read_files(files: list[tuple[Path, str]], name: str, src: SourceConfig, index: int,
                workdir: Path) -> list[datasets.Dataset | None]:
    """JSON lines and JSON stream through one generator per type; parquet and csv files go one by
    one through datasets' readers."""
    by_type: dict[str, list[Path]] = {}
    for path, kind in files:
        by_type.setdefault(kind, []).append(path)
    parts = []
    for kind, paths in by_type.items():
        if kind in ("jsonl", "json"):
            parts.append(_generated(kind, paths, name, src, index, workdir))
        else:
            parts += [_read_table(path, kind, n, name, index, workdir) for n, path in enumerate(paths)]
    return parts


def _load_disk(folder: Path, src: SourceConfig, index: int) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise SFTError(f"cannot read {folder} as a datasets.save_to_disk folder: {_root_message(exc)}. Fix: save it "
                       "again with save_to_disk, or point at the data files in it with a glob") from None
    if isinstance(loaded, datasets.DatasetDict):
        if src.hub_split not in loaded:
            raise ConfigError(f"data.sources[{index}].hub_split", f"'{src.hub_split}' is not a split of {folder}",
                              f"use one of: {', '.join(loaded)}")
        loaded = loaded[src.hub_split]
    return loaded


def _load_hub(src: SourceConfig, index: int) -> datasets.Dataset:
    from sft_cli.assets import go_offline_if_unreachable

    go_offline_if_unreachable()
    try:
        return datasets.load_dataset(src.path, split=src.hub_split)
    except Exception as exc:  # offline, gated, or a typo: one clear line either way
        raise SFTError(
            f"cannot load hub dataset '{src.path}' ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). "
            f"Offline? Download it elsewhere and set data.sources[{index}].path to a local "
            ".jsonl/.json/.parquet/.csv file or a datasets.save_to_disk folder."
        ) from None


def load_source(src: SourceConfig, index: int, workdir: Path) -> datasets.Dataset:
    """All rows of one source as raw rows (see module docstring)."""
    name = source_name(src, index)
    kind, paths = resolve_files(src, index)
    if kind == "hub":
        parts = [_from_table(_load_hub(src, index), name, src.path, None)]
    elif kind == "disk":
        parts = [_from_table(_load_disk(paths[0][0], src, index), name, str(paths[0][0]), None)]
    else:
        parts = _read_files(paths, name, src, index, workdir)
    parts = [part for part in parts if part is not None and len(part)]
    if not parts:
        # prepare says the same of a source whose rows are all rejected; here nothing was read at all.
        where = ", ".join(str(p) for p, _ in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise SFTError(f"source '{name}' has zero valid rows (0 read: no rows in {where or src.path}). "
                       f"Fix: point data.sources[{index}].path at a file with rows, or remove the source")
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def default_num_proc(rows: int, requested: int | None) -> int:
    """Worker processes for a map: spawning costs ~1 s each, so small data stays in-process."""
    if requested:
        return max(1, requested)
    return max(1, min(os.cpu_count() or 1, rows // 5000))
