"""Start an N-process training run on this machine: `python -m launch.local nproc=4 parallel.tp=2 ...`.

The config is composed and validated here first, so a bad layout fails before any process starts;
then torchrun starts `trainer.pretrain` once per rank with the same overrides. `parallel.dp` defaults to
nproc / (tp * pp).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from launch.common import fit_layout, tensor_parallel_env
from launch.rendezvous import free_port
from trainer.config import ConfigError

log = logging.getLogger(__name__)


def split_launcher_args(argv: list[str]) -> tuple[int | None, list[str]]:
    """Take `nproc=N` out of the arguments; everything else is a Hydra override for the trainer."""
    nproc = None
    rest = []
    for arg in argv:
        if arg.startswith("nproc="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"nproc={value!r}: must be a positive integer")
            nproc = int(value)
        else:
            rest.append(arg)
    return nproc, rest


def resolve_world(nproc: int | None, overrides: list[str]) -> tuple[int, list[str], dict[str, str]]:
    """Validate the config for this world size; return (nproc, overrides with parallel.dp explicit, env)."""
    config, overrides = fit_layout(overrides, nproc, f"nproc={nproc}")
    return config.parallel.world_size, overrides, tensor_parallel_env(config)


def torchrun_command(nproc: int, overrides: list[str], master_port: int) -> list[str]:
    """The torchrun invocation for `nproc` ranks of trainer.pretrain on this machine."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        f"--master_port={master_port}", "-m", "trainer.pretrain", *overrides,
    ]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    try:
        nproc, overrides = split_launcher_args(sys.argv[1:] if argv is None else argv)
        nproc, overrides, job_env = resolve_world(nproc, overrides)
    except ConfigError as err:
        log.error("config error: %s", err)
        return 2
    command = torchrun_command(nproc, overrides, free_port())
    log.info("starting %d processes: %s", nproc, " ".join(command[1:]))
    # One thread per rank unless told otherwise: ranks share the machine's cores.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **job_env, **os.environ}
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
