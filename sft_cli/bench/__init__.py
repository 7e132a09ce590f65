"""Benchmarks against TRL (`make bench`): each module writes its own section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the "## NAME" section of BENCHMARKS.md (up to the next "## "), keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {name}"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = [""] + lines[end:] if end < len(lines) else []
        text = "\n".join(lines[:start] + body.rstrip("\n").splitlines() + tail) + "\n"
    path.write_text(text)
