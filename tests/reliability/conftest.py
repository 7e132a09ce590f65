"""With SFT_RELIABILITY_JSON=PATH set (make reliability does), every test's outcome, duration and
recorded properties (trials, passes, rows, ...) are appended to PATH as JSON lines: the input of
RELIABILITY.md (see report.py)."""

from __future__ import annotations

import json
import os


def pytest_runtest_setup(item):
    """What the test checks, for the report: its docstring's first line, else its name in words."""
    doc = (getattr(item, "function", None).__doc__ or "").strip().splitlines()
    what = doc[0] if doc else item.originalname.removeprefix("test_").replace("_", " ")
    item.user_properties.append(("what", what))


def pytest_runtest_logreport(report):
    path = os.environ.get("SFT_RELIABILITY_JSON")
    if not path or (report.when != "call" and not (report.when == "setup" and report.outcome != "passed")):
        return
    properties = {}
    for key, value in report.user_properties:
        properties[key] = value  # hypothesis tests record running totals: the last one counts
    record = {"test": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 2), **properties}
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
