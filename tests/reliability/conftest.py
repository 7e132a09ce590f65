"""With SFT_RELIABILITY_JSON=PATH set (make reliability does), every test's outcome, duration and
recorded properties (trials, passes, rows, ...) are appended to PATH as JSON lines: the input of
RELIABILITY.md (see report.py).

A test that runs several trials counts them with the `trials` fixture, so `passes` is how many
held, also when some did not. A test that records nothing counts as one trial, passed or not."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import pytest


class Trials:
    """A test's trials and how many held, recorded as they run (report.py's trials / passes):

        for case in CASES:
            with trials.trial(case):
                assert ...        # a failure fails this trial; the next one still runs
        trials.check()            # then fails the test, naming the failed trials

    Counted before the asserts, not after them: recorded after, passes would equal trials by
    construction, and a failing test would record nothing."""

    def __init__(self, record_property):
        self._record = record_property
        self.count = self.passes = 0
        self.failures: list[tuple[str, Exception]] = []

    @contextmanager
    def trial(self, name: str):
        self.count += 1
        self._save()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - any error fails this trial only; check() raises it
            self.failures.append((name, exc))
        else:
            self.passes += 1
        self._save()

    def check(self) -> None:
        if self.failures:
            listed = "\n".join(f"  {name}: {type(exc).__name__}: {exc}" for name, exc in self.failures)
            raise AssertionError(f"{len(self.failures)} of {self.count} trials failed:\n{listed}") \
                from self.failures[0][1]

    def _save(self) -> None:  # running totals: the conftest hook keeps the last value of each
        self._record("trials", self.count)
        self._record("passes", self.passes)


@pytest.fixture
def trials(record_property) -> Trials:
    return Trials(record_property)


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
