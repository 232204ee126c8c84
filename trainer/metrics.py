"""Where step metrics go: a JSONL file in the run directory and W&B (offline by default), rank 0 only."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from trainer.config import LoggingConfig

log = logging.getLogger(__name__)


class MetricsSink:
    """Fans metrics out to the enabled backends; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict, enabled: bool, *,
                 resumed_at: int):
        """`resumed_at`: the step the run continues from (0 for a fresh start); the JSONL records past it
        are dropped, since this run writes those steps again."""
        self.enabled = enabled
        self._jsonl = None
        self._wandb_run = None
        if not enabled:
            return
        if cfg.jsonl:
            path = run_dir / "metrics.jsonl"
            drop_records_after(path, resumed_at)
            self._jsonl = open(path, "a", buffering=1)
        if cfg.wandb and cfg.wandb_mode != "disabled":
            self._wandb_run = _start_wandb(run_dir, cfg, run_name, config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json_line({"step": step, **metrics}))
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update(values)
        if self._jsonl is not None:
            self._jsonl.write(json_line({"summary": values}))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            log.info("W&B run saved in %s", self._wandb_run.dir)


def json_line(record: dict[str, Any]) -> str:
    """One line of strict JSON: NaN and infinities, which JSON lacks, are written as null."""
    return json.dumps(_finite_or_none(record), allow_nan=False) + "\n"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite `path` (atomically, as strict JSON) without the records a run resumed at `step` writes again.

    Kept: records of steps up to `step`. Dropped: later steps (a crashed or preempted attempt got past the
    checkpoint it resumes from), summaries (the run writes its own when it ends), and unreadable lines
    (a line cut short by a crash)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [record for record in map(_step_record, lines) if record is not None and record["step"] <= step]
    staging = path.with_name(path.name + ".tmp")
    staging.write_text("".join(json_line(record) for record in kept))
    os.replace(staging, path)
    if len(kept) < len(lines):
        log.info("%s: dropped %d records past step %d, which this run writes again", path,
                 len(lines) - len(kept), step)


def _step_record(line: str) -> dict | None:
    """One JSONL line as a record with an integer step; None for a summary, a blank or an unreadable line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(record, dict) and isinstance(record.get("step"), int):
        return record
    return None


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
