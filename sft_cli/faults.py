"""Fault injection points for the reliability tests (`tests/reliability/`). Env vars, never set
in normal use; each names places as `where` or `where:step`, comma-separated:

    SFT_FAULT_KILL_AT=checkpoint:4       SIGKILL this process while step 4's checkpoint is half written
    SFT_FAULT_KILL_AT=prepared,packed    SIGKILL after prepare / pack wrote everything but before the rename
    SFT_FAULT_ENOSPC_AT=checkpoint:4     raise "No space left on device" there instead

(train.py has the step-level ones: SFT_FAULT_NAN_STEPS, SFT_FAULT_KILL_STEP.)
"""

from __future__ import annotations

import errno
import os
import signal


def _armed(variable: str, where: str, step: int | None) -> bool:
    wanted = {item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()}
    return where in wanted or (step is not None and f"{where}:{step}" in wanted)


def fault_point(where: str, step: int | None = None) -> None:
    if _armed("SFT_FAULT_KILL_AT", where, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed("SFT_FAULT_ENOSPC_AT", where, step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<injected at {where}>")
