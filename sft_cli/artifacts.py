"""Atomic, self-describing outputs: every stage writes into a temp folder, puts
`manifest.json` in last, then renames the folder into place. A folder with a
manifest is complete; a crash leaves only a `.tmp-*` folder that nothing reads.

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


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp sibling of `final`; on success swap it into place, on error remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            # Two renames instead of rmtree-then-rename: the old output stays whole until
            # the new one is fully in place.
            old = final.parent / f".{final.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
