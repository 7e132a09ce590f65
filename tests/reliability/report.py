"""`make reliability`: run the whole reliability battery (slow tests included, more hypothesis
examples) and the 1M-row scale check, then write RELIABILITY.md from what they measured.

    python tests/reliability/report.py                 # everything (~25 min on 2 cores)
    python tests/reliability/report.py --no-scale      # without the 1M-row prepare + pack run
    python tests/reliability/report.py --examples 50   # fewer hypothesis examples per property
    python tests/reliability/report.py --scale-json s.json   # a scale result measured before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AREAS = {  # test file -> section of the report
    "test_bad_input.py": "bad input",
    "test_faults.py": "faults",
    "test_config_fuzz.py": "config fuzz",
    "test_security.py": "security",
}


def run_battery(results: Path, examples: int) -> int:
    env = {**os.environ, "SFT_RELIABILITY_JSON": str(results), "SFT_FUZZ_EXAMPLES": str(examples)}
    # -o addopts: the default run deselects reliability_slow; here everything runs.
    cmd = [sys.executable, "-m", "pytest", "tests/reliability", "-o", "addopts=-q -ra --import-mode=importlib",
           "-p", "no:cacheprovider", "-W", "ignore"]
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def run_scale(out: Path, rows: int) -> dict | None:
    code = subprocess.run([sys.executable, "-m", "sft_cli.bench.scale", "--rows", str(rows), "--json", str(out)],
                          cwd=REPO).returncode
    if not out.exists():
        return {"passed": False, "error": f"exit code {code}"}
    return json.loads(out.read_text())


def table(records: list[dict]) -> str:
    lines = ["| area | what is checked | test | trials | passes | result | seconds |", "|---|---|---|---|---|---|---|"]
    order = [*AREAS.values(), "other"]
    for r in sorted(records, key=lambda r: (order.index(r["area"]), r["test"])):
        trials = r.get("trials", r.get("rows", 1))
        passes = r.get("passes", trials if r["outcome"] == "passed" else 0)
        name = r["test"].split("::", 1)[1]
        lines.append(f"| {r['area']} | {r['what']} | `{name}` | {trials} | {passes} | {r['outcome']} | "
                     f"{r['seconds']} |")
    return "\n".join(lines)


def render(records: list[dict], scale: dict | None, command: str, seconds: float) -> str:
    passed = sum(r["outcome"] == "passed" for r in records)
    rows_lost = sum(int(r.get("rows_lost", 0)) for r in records)
    fuzz_rows = sum(int(r.get("rows", 0)) for r in records if r["area"] == "bad input")
    parts = [
        "# Reliability",
        "",
        "Every fault and bad-input class we promise to handle, how it is tested, and what the last run measured.",
        f"Produced by `{command}` (`make reliability`) on {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}, in {seconds / 60:.1f} min. The fast subset of these tests runs in "
        "`make test` (CI); the slow ones are marked `reliability_slow`.",
        "",
        f"**{passed} of {len(records)} tests passed.** Generated rows pushed through prepare's row pipeline: "
        f"{fuzz_rows}; rows lost (neither kept nor rejected with a reason): {rows_lost}.",
        "",
        "Trials: hypothesis examples, generated rows, kills delivered or cases in a table; passes: those that held.",
        "",
        table(records),
    ]
    if scale:
        parts += ["", "## Scale", ""]
        if "prepare" in scale:
            limit = scale.get("limit_mb", 4096)
            parts += ["| stage | rows | seconds | peak RSS MB | limit MB | result |", "|---|---|---|---|---|---|",
                      f"| prepare | {scale['rows']} | {scale['prepare']['seconds']:.0f} | "
                      f"{scale['prepare']['peak_rss_mb']:.0f} | {limit} | "
                      f"{'pass' if scale['prepare']['peak_rss_mb'] < limit else 'FAIL'} |",
                      f"| pack | {scale['pack'].get('rows', '')} rows | {scale['pack']['seconds']:.0f} | "
                      f"{scale['pack']['peak_rss_mb']:.0f} | {limit} | "
                      f"{'pass' if scale['pack']['peak_rss_mb'] < limit else 'FAIL'} |",
                      "", f"prepare kept {scale['prepare'].get('kept')} and rejected {scale['prepare'].get('rejected')} "
                      f"of {scale['prepare'].get('read')} rows read (kept + rejected = read). "
                      "Command: `python -m sft_cli.bench.scale` (also in BENCHMARKS.md)."]
        else:
            parts += [f"scale run failed: {scale.get('error')}"]
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="hypothesis examples per property")
    parser.add_argument("--no-scale", action="store_true", help="skip the 1M-row prepare + pack run")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the scale run")
    parser.add_argument("--scale-json", help="use this `sft_cli.bench.scale --json` result instead of a new run")
    parser.add_argument("--out", default=str(REPO / "RELIABILITY.md"))
    parser.add_argument("--results", default=str(REPO / "runs" / "reliability" / "results.jsonl"),
                        help="where the battery's per-test results go (kept for --render-only)")
    parser.add_argument("--render-only", action="store_true", help="write the report from --results, run nothing")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results, code = Path(args.results), 0
        if not args.render_only:
            results.parent.mkdir(parents=True, exist_ok=True)
            results.unlink(missing_ok=True)
            code = run_battery(results, args.examples)
        records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
        for r in records:
            r["area"] = AREAS.get(Path(r["test"].split("::")[0]).name, "other")
        if args.scale_json:
            scale = json.loads(Path(args.scale_json).read_text())
        else:
            scale = None if args.no_scale or args.render_only else run_scale(Path(tmp) / "scale.json", args.rows)
    command = "python tests/reliability/report.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a not in ("--render-only",))
    Path(args.out).write_text(render(records, scale, command, time.time() - started))
    print(f"wrote {args.out}: {sum(r['outcome'] == 'passed' for r in records)}/{len(records)} passed")
    return code or (0 if scale is None or scale.get("passed") else 1)


if __name__ == "__main__":
    sys.exit(main())
