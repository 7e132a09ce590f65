"""Benchmarks against TRL (`make bench`): each module writes its own section of BENCHMARKS.md."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


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


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None, log: Path | None = None) -> dict:
    """Run `cmd` to the end: {seconds, peak_rss_mb, returncode}, stdout and stderr into `log`.

    Peak RSS is the larger of two views: the summed RSS of the process and all its descendants
    (sampled every 50 ms from /proc, so datasets.map's worker processes count), and the largest
    single process's exact high-water mark (wait4's ru_maxrss, which a short spike between two
    samples cannot escape). Both count the memory-mapped file pages a process has touched.
    """
    with open(log or os.devnull, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    peak_tree, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak_tree[0] = max(peak_tree[0], tree_rss_bytes(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # not Popen.wait: wait4 also returns the child's rusage
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen, so it never waits again
    peak_mb = max(peak_tree[0] / 2**20, usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "returncode": proc.returncode}


def tree_rss_bytes(root: int) -> int:
    """Summed resident memory of `root` and its descendants; processes that exit meanwhile count 0."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # Fields after the parenthesised command name (which may hold spaces): state, ppid, ...
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        pending += children.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
        except OSError:
            pass
    return total
