"""One rank of a multi-process `sft train`, started by launch.py through torchrun:

    python -m sft_cli.worker run_dir/config.yaml

It reads the resolved config the launcher wrote (no Hydra here) and runs the same
`train.run` a single process does; torchrun's environment says which rank it is.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from sft_cli import train
    from sft_cli.cli import guarded
    from sft_cli.config import load_config

    if len(argv) != 1:
        print("usage: python -m sft_cli.worker RUN_DIR/config.yaml", file=sys.stderr)
        return 2
    return guarded(lambda: train.run(load_config(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
