"""Where step metrics go: a JSONL file in the run directory and W&B (offline by default), rank 0 only."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from trainer.config import LoggingConfig

log = logging.getLogger(__name__)


class MetricsSink:
    """Fans metrics out to the enabled backends; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict, enabled: bool):
        self.enabled = enabled
        self._jsonl = None
        self._wandb_run = None
        if not enabled:
            return
        if cfg.jsonl:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb and cfg.wandb_mode != "disabled":
            self._wandb_run = _start_wandb(run_dir, cfg, run_name, config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update(values)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"summary": values}) + "\n")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            log.info("W&B run saved in %s", self._wandb_run.dir)


def _start_wandb(run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict):
    import wandb

    # The environment wins, so WANDB_MODE=offline keeps a run off the network whatever the config says.
    mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
    return wandb.init(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity,
        name=run_name,
        dir=str(run_dir),
        config=config,
        mode=mode,
        resume="allow",
        id=_wandb_run_id(run_dir),
    )


def _wandb_run_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run appends to the same W&B run."""
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)
    id_file.write_text(run_id)
    return run_id
