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


def remote_code_refusal(what: str, exc: Exception) -> ConfigError | None:
    """transformers refusing a folder that ships its own Python code (auto_map), because we pass
    trust_remote_code=False; its message says so only past the first line, so name the key here."""
    message = str(exc)
    if "trust_remote_code" not in message and "custom code" not in message:
        return None
    return ConfigError("model.trust_remote_code", f"{what} ships its own Python code (auto_map); sft does not "
                       "run it by default", "set model.trust_remote_code=true in a recipe only if you have read "
                       "and trust that code")


def load_error(what: str, exc: Exception, hint: str = "") -> SFTError:
    """A failed `from_pretrained` as a message the user can act on."""
    refusal = remote_code_refusal(what, exc)
    if refusal is not None:
        return refusal
    message = str(exc)
    first = message.splitlines()[0][:200] if message else type(exc).__name__
    return SFTError(f"cannot load {what}: {first}" + (f". {hint}" if hint else ""))
