"""Pretraining entry point: `python -m trainer.pretrain [overrides]` composes the Hydra config and runs it.

The config is validated before the heavy libraries are imported, so a bad value fails in about a second
with one line naming the key.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import hydra
from omegaconf import DictConfig

from trainer.config import CONF_DIR, ConfigError, register_configs, to_config

log = logging.getLogger(__name__)

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Validate the composed config, then pretrain; bad input ends with one line naming the problem."""
    started = time.perf_counter()
    try:
        config = to_config(cfg)
    except ConfigError as err:
        log.error("config error: %s", err)
        sys.exit(2)
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


if __name__ == "__main__":
    main()
