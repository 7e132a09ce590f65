"""`sft train trainer.nproc=N`: start N workers through torchrun's elastic launcher.

The config is composed and resolved once, here, and written to run_dir/config.yaml; every
worker reads that file (`python -m sft_cli.worker run_dir/config.yaml`), so no rank runs
Hydra and values such as `${now:}` cannot differ between ranks. prepare and pack run here,
once per node, before any worker starts.

    sft train recipe=demo trainer.nproc=2                       # one node, free port on 127.0.0.1
    sft train recipe=demo trainer.nnodes=2 trainer.node_rank=0 trainer.rdzv_endpoint=10.0.0.1:29500
    torchrun --nproc-per-node 2 -m sft_cli train recipe=demo     # an outer torchrun: workers join it

A worker that dies ends the job (max_restarts=0): the others are stopped and the failing rank,
its exit code or signal are reported; the exit code is 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from sft_cli import console as ui
from sft_cli.config import SFTConfig, to_yaml
from sft_cli.distributed import launched_by_torchrun
from sft_cli.errors import ConfigError, SFTError
from sft_cli.run_dir import write_text_atomic

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def nproc_per_node(cfg: SFTConfig) -> int:
    value = cfg.trainer.nproc
    if value == "auto":
        import torch

        return max(torch.cuda.device_count(), 1)
    return int(value)  # config.validate() admitted a positive int, or one as a string


def should_launch(cfg: SFTConfig) -> bool:
    """Spawn workers unless we already are one (torchrun set our env)."""
    return not launched_by_torchrun() and (nproc_per_node(cfg) > 1 or cfg.trainer.nnodes > 1)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One process at a time builds run_dir's prepared/packed data (launchers of several
    nodes sharing a filesystem, or ranks of an outer torchrun); the others then reuse it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def rendezvous_endpoint(cfg: SFTConfig) -> str:
    endpoint = cfg.trainer.rdzv_endpoint
    if endpoint is None:
        if cfg.trainer.nnodes > 1:
            raise ConfigError("trainer.rdzv_endpoint", "is required when trainer.nnodes > 1",
                              "set it to HOST:PORT of node 0, the same on every node")
        return f"127.0.0.1:{_free_port()}"
    host, _, port = endpoint.rpartition(":")  # config.validate() admitted HOST:PORT only
    if cfg.trainer.node_rank == 0 and host in LOCAL_HOSTS | {socket.gethostname()} and not _port_free(int(port)):
        raise ConfigError("trainer.rdzv_endpoint", f"port {port} is already in use on this machine",
                          "pick another port, or leave rdzv_endpoint unset for a free one (single node)")
    return endpoint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def launch(cfg: SFTConfig, build_data: Callable[[SFTConfig], object]) -> int:
    """Start this node's workers through torchrun, after `build_data(cfg)` (train passes pack's
    ensure_packed) built the run's data once, so the workers only read it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc, nnodes = nproc_per_node(cfg), cfg.trainer.nnodes
    endpoint = rendezvous_endpoint(cfg)
    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir):
        build_data(cfg)
    config_path = run_dir / "config.yaml"
    write_text_atomic(config_path, to_yaml(cfg))
    _set_worker_threads(nproc)
    ui.err.print(f"launching {nproc} worker(s) x {nnodes} node(s) (node {cfg.trainer.node_rank}, "
                 f"rendezvous {endpoint}) reading {config_path}")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we report failures ourselves
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=_run_id(cfg, endpoint),
        rdzv_backend="c10d", rdzv_endpoint=endpoint,
        rdzv_configs={"is_host": cfg.trainer.node_rank == 0, "join_timeout": 600},
        max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "sft_cli.worker", str(config_path.resolve()))
    except ChildFailedError as exc:
        global_rank, failure = exc.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        ui.err.print(f"[bold red]error[/] worker rank {global_rank} failed ({how}); the other workers were stopped.")
        raise SFTError("training failed; the first failing rank's own message is above. "
                       "Re-running the same command resumes from the last checkpoint.") from None
    except SignalException as exc:
        ui.err.print(f"[yellow]stopped by {exc.sigval.name}: workers saved a checkpoint and exited.")
        return 130 if exc.sigval.name == "SIGINT" else 0
    return 0


def _set_worker_threads(nproc: int) -> None:
    """Split this machine's cores between the local workers (CPU), as torchrun does."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))


def _run_id(cfg: SFTConfig, endpoint: str) -> str:
    """The same on every node of one job (they share run_dir and endpoint), unique otherwise."""
    if cfg.trainer.nnodes > 1:
        return "sft-" + uuid.uuid5(uuid.NAMESPACE_URL, f"{Path(cfg.run_dir).name}|{endpoint}").hex[:12]
    return "sft-" + uuid.uuid4().hex[:12]
