"""Pretraining entry point: `python -m trainer.pretrain [overrides]` composes the Hydra config and runs it.

The config is validated before the heavy libraries are imported, so a bad key, type or value fails in about
a second with one line on stderr naming the key, and exit status 2: whether Hydra refuses it while composing
(an unknown key or preset, a wrong type) or our dataclasses do; so does a data.source that is missing when
the data has to be prepared. The preemption signal handlers go in next, before the heavy imports. What the
run then refuses (a checkpoint, the data, a model too large for the device, a failed save) also ends in one
line and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import DataConfig
from data_pipeline.sources import SourceError
from trainer.config import CONF_DIR, Config, ConfigError, config_error, register_configs, to_config
from trainer.preemption import Preempted, PreemptionWatch

log = logging.getLogger(__name__)

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def train(cfg: DictConfig) -> None:
    """Validate the composed config, then pretrain; bad input ends with one line naming the problem."""
    run_job(cfg)


def run_job(cfg: DictConfig, check: Callable[[Config], None] | None = None) -> None:
    """One Hydra job of an entry point: validate the composed config (and `check` it), then run it."""
    started = time.perf_counter()
    try:
        config = to_config(cfg)
        if check is not None:
            check(config)
        check_data_source(config.data)
        check_tokenizer_path(config)
    except (ConfigError, SourceError, FileNotFoundError) as err:
        exit_config_error(err)
    # From here on a preemption signal stops the run cleanly, even during the imports and start-up below.
    preemption = PreemptionWatch(config.train.preemption_signals)
    try:
        run_or_exit(config, preemption)
    finally:
        preemption.close()
    log.info("total wall time %.1f s", time.perf_counter() - started)


def check_data_source(data: DataConfig) -> None:
    """Raise now, before the heavy imports, what preparing the data would raise about data.source much later
    (no source named, a path that does not exist, no document files, a file of another type), if the data is
    going to be prepared: no index.json yet, or one of another config."""
    from data_pipeline.corpus import parse_sources
    from data_pipeline.prepare import INDEX_FILE, fingerprint, is_remote
    from data_pipeline.sources import check_source

    if is_remote(data.prepared_dir) or data.prepare == "never":
        return
    index_file = Path(data.prepared_dir) / INDEX_FILE
    if data.prepare == "auto" and index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
        except ValueError:
            index = None
        if isinstance(index, dict) and (index.get("external") or index.get("kind") == "sft"
                                        or index.get("fingerprint") == fingerprint(data)):
            return  # reused as it is: the source is not read
    try:
        sources = parse_sources(data.source)
    except ValueError as err:  # data.source names no source (only commas and blanks)
        raise SourceError(str(err)) from None
    for source in sources:
        check_source(source)


def check_tokenizer_path(config: Config) -> None:
    """Before any data is prepared: a data.tokenizer_path of another vocabulary than the model's is refused."""
    path = config.data.tokenizer_path
    if path and Path(path).is_file():
        from tokenizers import Tokenizer

        try:
            size = Tokenizer.from_file(path).get_vocab_size()
        except Exception as err:  # noqa: BLE001 - the tokenizers library reports any bad file as one exception
            raise ConfigError(f"data.tokenizer_path={path}: not a tokenizer.json ({str(err).splitlines()[0]})") from None
        from trainer.run import check_vocabulary

        check_vocabulary(config, {"vocab_size": size})


def one_line_errors() -> tuple[type[Exception], ...]:
    """What a run reports in one line with exit status 2: bad input (config, data, checkpoint) and refusals."""
    from data_pipeline.index_file import BadIndexError
    from data_pipeline.shards import CorruptShardError
    from trainer.checkpoint import CheckpointError
    from trainer.loop import TrainingDiverged

    return (ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError, SourceError, CorruptShardError,
            BadIndexError)


def run_or_exit(config: Config, preemption: PreemptionWatch | None = None) -> None:
    """Pretrain; known failures end in one line and exit status 2, a preemption in its own exit status."""
    from trainer.run import run

    try:
        run(config, preemption)
    except one_line_errors() as err:
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


def exit_config_error(err: Exception) -> NoReturn:
    """One line on stderr, as the launchers write it, and exit status 2.

    Written directly: Hydra's job logging, when it is set up at all, goes to stdout."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')} ERROR] config error: {err}\n")
    sys.exit(2)


def main(job: Callable[[], None] = train) -> None:
    """`python -m trainer.pretrain`: Hydra parses the command line and runs `job` (`train`, or another entry
    point's Hydra main), once or per sweep point."""
    # With HYDRA_FULL_ERROR=1 Hydra raises what it refuses instead of printing several lines and exiting
    # with status 1; a user who set it gets the full trace as asked.
    full_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        job()
    except (HydraException, OmegaConfBaseException) as err:
        if full_trace:
            raise
        exit_config_error(config_error(err))


if __name__ == "__main__":
    main()
