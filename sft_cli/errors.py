"""Errors with exit codes: 2 for usage/config mistakes, 1 for runtime failures.

Raise these instead of printing and exiting, so library code stays testable and
the CLI is the one place that turns them into messages and exit codes.
"""

from __future__ import annotations


class SFTError(Exception):
    """A runtime failure the user can act on (bad data, missing files). Exit code 1."""

    exit_code = 1


class ConfigError(SFTError):
    """A config or usage mistake. Names the key and the fix. Exit code 2."""

    exit_code = 2

    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}" + (f"\n  fix: {fix}" if fix else ""))


class NotImplementedVerb(SFTError):
    exit_code = 2
