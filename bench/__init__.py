"""Benchmarks against TRL, not part of the installed package: `python -m bench.<name>` from the
repository root (make bench), each writing its own section of BENCHMARKS.md. Shared code: bench/common.py."""
