"""Pretraining entry point: `python -m trainer.pretrain [overrides]` composes the Hydra config and runs it.

The config is validated before the heavy libraries are imported, so a bad key, type or value fails in about
a second with one line on stderr naming the key, and exit status 2: whether Hydra refuses it while composing
(an unknown key or preset, a wrong type) or our dataclasses do.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import NoReturn

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from trainer.config import CONF_DIR, ConfigError, config_error, register_configs, to_config

log = logging.getLogger(__name__)

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def train(cfg: DictConfig) -> None:
    """Validate the composed config, then pretrain; bad input ends with one line naming the problem."""
    started = time.perf_counter()
    try:
        config = to_config(cfg)
    except ConfigError as err:
        exit_config_error(err)
    from trainer.checkpoint import CheckpointError
    from trainer.preemption import Preempted
    from trainer.run import run

    try:
        run(config)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        log.error("error: %s", err)
        sys.exit(2)
    except Preempted as stop:
        log.warning("%s; run again (or requeue) to resume", stop)
        if config.train.requeue_on_preemption:
            _requeue_slurm_job()
        sys.exit(config.train.preemption_exit_code)
    except Exception as err:
        from trainer.parallel import collective_failure

        if (line := collective_failure(err)) is None:
            raise
        log.error("%s", line)
        sys.exit(1)
    log.info("total wall time %.1f s", time.perf_counter() - started)


def _requeue_slurm_job() -> None:
    """Inside a SLURM job, rank 0 queues it again (see launch/requeue.py); a failure is logged, not raised."""
    from launch.requeue import requeue_own_job

    try:
        job_id = requeue_own_job()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        log.error("could not requeue the job: %s; resubmit it to resume", err)
        return
    if job_id is not None:
        log.warning("requeued SLURM job %s; it resumes from the checkpoint when it starts again", job_id)


def exit_config_error(err: ConfigError) -> NoReturn:
    """One line on stderr, as the launchers write it, and exit status 2.

    Written directly: Hydra's job logging, when it is set up at all, goes to stdout."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')} ERROR] config error: {err}\n")
    sys.exit(2)


def main() -> None:
    """`python -m trainer.pretrain`: Hydra parses the command line and runs `train`, once or per sweep point."""
    # With HYDRA_FULL_ERROR=1 Hydra raises what it refuses instead of printing several lines and exiting
    # with status 1; a user who set it gets the full trace as asked.
    full_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        train()
    except (HydraException, OmegaConfBaseException) as err:
        if full_trace:
            raise
        exit_config_error(config_error(err))


if __name__ == "__main__":
    main()
