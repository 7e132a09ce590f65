"""What produced a run, written to `run_dir/provenance.json` when training starts: the command
line, package versions, the project's git commit, and fingerprints of the data, tokenizer and
chat template. With `run_dir/config.yaml` (the resolved config) a run can be replayed exactly:

    sft train recipe=runs/x/config.yaml run_dir=runs/x-replay
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sft_cli.artifacts import fingerprint, hash_file, package_versions, read_manifest, write_json_atomic

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
