"""`python -m sft_cli VERB ...` is the same as `sft VERB ...`."""

from sft_cli.cli import main

main()
