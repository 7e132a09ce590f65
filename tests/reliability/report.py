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
    code = subprocess.run([sys.executable, "-m", "bench.scale", "--rows", str(rows), "--json", str(out)],
                          cwd=REPO).returncode
    if not out.exists():
        return {"passed": False, "error": f"exit code {code}"}
    return json.loads(out.read_text())


def grouped(records: list[dict]) -> list[dict]:
    """One row per test function: its parametrized cases summed (trials, passes, seconds)."""
    groups: dict[str, dict] = {}
    for r in records:
        name = r["test"].split("::", 1)[1].split("[", 1)[0]
        trials = int(r.get("trials", r.get("rows", 1)))
        # Recorded passes are counted trial by trial (also in a failed test); without them the
        # test's outcome is the only verdict, all or nothing.
        passes = int(r["passes"]) if "passes" in r else trials if r["outcome"] == "passed" else 0
        g = groups.setdefault(name, {"area": r["area"], "what": r["what"], "test": name, "cases": 0, "trials": 0,
                                     "passes": 0, "failed": 0, "seconds": 0.0})
        g["cases"] += 1
        g["trials"] += trials
        g["passes"] += passes
        g["failed"] += r["outcome"] != "passed"
        g["seconds"] += float(r["seconds"])
    return list(groups.values())


def table(records: list[dict]) -> str:
    lines = ["| area | what is checked | test | cases | trials | passes | result | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    order = [*AREAS.values(), "other"]
    for g in sorted(grouped(records), key=lambda g: (order.index(g["area"]), g["test"])):
        result = "pass" if not g["failed"] else f"**{g['failed']} FAILED**"
        lines.append(f"| {g['area']} | {g['what']} | `{g['test']}` | {g['cases']} | {g['trials']} | {g['passes']} | "
                     f"{result} | {g['seconds']:.0f} |")
    return "\n".join(lines)


def classes_table(records: list[dict]) -> str:
    """The hand-written bad-input classes of the prepare end-to-end test, each with its verdict."""
    cases = next((r["cases"] for r in records if "cases" in r), [])
    if not cases:
        return ""
    rows = ["| input row | expected and got |", "|---|---|"]
    def cell(text: str) -> str:  # markdown: no table pipes
        return text.replace("|", "\\|")

    rows += [f"| {cell(text)} | {reason} |" for text, reason in cases]
    return "\n".join(rows)


def render(records: list[dict], scale: dict | None, command: str) -> str:
    seconds = sum(float(r["seconds"]) for r in records)
    passed = sum(r["outcome"] == "passed" for r in records)
    rows_lost = sum(int(r.get("rows_lost", 0)) for r in records)
    fuzz_rows = sum(int(r.get("rows", 0)) for r in records if r["area"] == "bad input")
    parts = [
        "# Reliability",
        "",
        "Every fault and bad-input class we promise to handle, how it is tested, and what the last run measured.",
        f"Produced by `{command}` (`make reliability`) on {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}; the tests took {seconds / 60:.1f} min. CI runs all but the "
        "`reliability_slow` ones: the bad-input, fuzz and security tests in `make test`, the fault tests "
        "(processes that are killed and resumed) in `make test-slow`.",
        "",
        f"**{passed} of {len(records)} tests passed.** Generated rows pushed through prepare's row pipeline: "
        f"{fuzz_rows}; rows lost (neither kept nor rejected with a reason): {rows_lost}.",
        "",
        "Trials: hypothesis examples, generated rows, kills delivered or cases in a table; passes: those that held.",
        "",
        table(records),
    ]
    classes = classes_table(records)
    if classes:
        parts += ["", "## Bad-input classes through the real `sft prepare`", "",
                  "One row of each, between valid rows, in one file; every bad row rejected under this reason at "
                  "its own line number, every valid one kept, read = kept + rejected.", "", classes]
    if scale:
        parts += ["", "## Scale", ""]
        if "prepare" in scale:
            limit = scale.get("limit_mb", 4096)
            parts += ["| stage | rows | seconds | peak RSS MB | limit MB | result |", "|---|---|---|---|---|---|",
                      f"| prepare | {scale['rows']:,} conversations | {scale['prepare']['seconds']:.0f} | "
                      f"{scale['prepare']['peak_rss_mb']:,.0f} | {limit:,} | "
                      f"{'pass' if scale['prepare']['peak_rss_mb'] < limit else 'FAIL'} |",
                      f"| pack | {scale['prepare'].get('kept', 0):,} examples -> {scale['pack'].get('rows', 0):,} rows | "
                      f"{scale['pack']['seconds']:.0f} | {scale['pack']['peak_rss_mb']:,.0f} | {limit:,} | "
                      f"{'pass' if scale['pack']['peak_rss_mb'] < limit else 'FAIL'} |",
                      "", f"prepare kept {scale['prepare'].get('kept', 0):,} and rejected {scale['prepare'].get('rejected', 0):,} "
                      f"of {scale['prepare'].get('read', 0):,} rows read (kept + rejected = read). "
                      "Command: `python -m bench.scale` (also in BENCHMARKS.md)."]
        else:
            parts += [f"scale run failed: {scale.get('error')}"]
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="hypothesis examples per property")
    parser.add_argument("--no-scale", action="store_true", help="skip the 1M-row prepare + pack run")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the scale run")
    parser.add_argument("--scale-json", help="use this `bench.scale --json` result instead of a new run")
    parser.add_argument("--out", default=str(REPO / "RELIABILITY.md"))
    parser.add_argument("--results", default=str(REPO / "runs" / "reliability" / "results.jsonl"),
                        help="where the battery's per-test results go (kept for --render-only)")
    parser.add_argument("--render-only", action="store_true", help="write the report from --results, run nothing")
    args = parser.parse_args()
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
    command = "python tests/reliability/report.py" + ("" if args.examples == 300 else f" --examples {args.examples}")
    Path(args.out).write_text(render(records, scale, command))
    print(f"wrote {args.out}: {sum(r['outcome'] == 'passed' for r in records)}/{len(records)} passed")
    return code or (0 if scale is None or scale.get("passed") else 1)


if __name__ == "__main__":
    sys.exit(main())
