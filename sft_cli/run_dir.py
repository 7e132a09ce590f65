"""The run_dir contract in one place: how every stage writes its outputs, what produced a run,
and where training metrics go.

    run_dir/
      prepared/ packed/ checkpoints/step-N/ final/ eval/ merged/   each written whole (atomic_dir)
      config.yaml        the resolved config (replay: sft train recipe=run_dir/config.yaml)
      provenance.json    command line, package versions, git commit, data/tokenizer fingerprints
      metrics.jsonl      one line per optimizer step, eval lines marked "type": "eval"

Atomic, self-describing outputs: every stage writes into a temp folder, puts `manifest.json` in
last, then renames the folder into place. A folder with a manifest is complete; a crash leaves
only a `.tmp-*` folder that nothing reads.

    with atomic_dir(Path("runs/x/prepared")) as tmp:
        ...  # write files into tmp
        write_manifest(tmp, fingerprint="ab12", extra={"rows": 10})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_VERSIONED = ("sft-cli", "torch", "transformers", "datasets", "peft", "tokenizers", "hydra-core")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _writer_tag() -> str:
    """PID and host in temp names: a leftover is stale only if its writer is dead on this host
    (run_dir may be shared by several nodes)."""
    return f"{os.getpid()}-{socket.gethostname().replace('-', '_')}-{time.time_ns()}"


def remove_stale_temps(final: Path) -> None:
    """Delete what a killed writer left beside `final` (`.NAME.tmp-PID-HOST-*`, `.NAME.old-...`):
    never read, only disk space. A live writer's folder is left alone."""
    host = socket.gethostname().replace("-", "_")
    for leftover in final.parent.glob(f".{final.name}.*-*-*-*"):
        kind, pid, writer_host, _ = leftover.name.removeprefix(f".{final.name}.").split("-", 3)
        if kind in ("tmp", "old") and pid.isdigit() and writer_host == host and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`, replacing what is there. Two renames instead of
    rmtree-then-rename: the old output stays whole until the new one is fully in place."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{_writer_tag()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp sibling of `final`; on success swap it into place, on error remove it."""
    from sft_cli.faults import fault_point

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = final.parent / f".{final.name}.tmp-{_writer_tag()}"
    tmp.mkdir()
    try:
        yield tmp
        fault_point(final.name)  # reliability tests: a kill here must leave `final` as it was
        swap_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write (disk full): no half file left behind


def write_manifest(folder: Path, fingerprint: str, extra: dict[str, Any] | None = None) -> None:
    """Written last: its presence is what marks `folder` complete."""
    payload = {
        "fingerprint": fingerprint,
        "created_unix": time.time(),
        "versions": package_versions(),
        **(extra or {}),
    }
    write_json_atomic(Path(folder) / MANIFEST, payload)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(folder: Path, fingerprint: str | None = None) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and (fingerprint is None or manifest.get("fingerprint") == fingerprint)


def hash_file(path: Path, hasher: Any = None) -> str:
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (sorted keys, so dict order never matters)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- provenance.json ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> dict | None:
    """The project's commit (and whether the tree had local changes), when it is a git checkout."""
    if not (REPO / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def write_provenance(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    tokenizer_dir = run_dir / "prepared" / "tokenizer"
    template = tokenizer_dir / "chat_template.jinja"
    record = {
        "command": os.environ.get("SFT_COMMAND", ""),
        "versions": package_versions(),
        "git": git_commit(),
        "fingerprints": {
            "prepared": (read_manifest(run_dir / "prepared") or {}).get("fingerprint"),
            "packed": (read_manifest(run_dir / "packed") or {}).get("fingerprint"),
            "tokenizer": fingerprint(hash_file(tokenizer_dir / "tokenizer.json"))
            if (tokenizer_dir / "tokenizer.json").exists() else None,
            "chat_template": fingerprint(template.read_text()) if template.exists() else None,
        },
    }
    write_json_atomic(run_dir / "provenance.json", record)
    return record


# --- metrics.jsonl --------------------------------------------------------------------------

class MetricsLog:
    """Where training metrics go: `run_dir/metrics.jsonl` (one JSON line per optimizer step, eval
    lines marked `"type": "eval"`), each line also handed to the run's trackers (trackers.py).
    Rank 0 writes; other ranks get a log that drops lines.

        with MetricsLog(run_dir, enabled=world().is_main, trackers=trackers) as log:
            log.write({"step": 1, "loss": 2.3, ...})
    """

    def __init__(self, run_dir: Path, enabled: bool = True, trackers=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = trackers
        self._file = None

    def __enter__(self) -> MetricsLog:
        if self.enabled:
            self._file = open(self.path, "a")
        return self

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        if self.trackers is not None:
            self.trackers.log_metrics(record)

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
