"""A preemption warning stops the run after the current step with a checkpoint; the rerun continues the curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import SMALL_RUN, small_corpus_args
from trainer.config import ConfigError
from trainer.run import run


def _steps_logged(metrics) -> int:
    if not metrics.is_file():
        return 0
    return max((json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()), default=0)


def test_a_signal_checkpoints_exits_for_requeue_and_the_rerun_continues(small_run, small_corpus, tmp_path):
    common = [*SMALL_RUN, *small_corpus_args(small_corpus), "train.max_steps=300", "train.eval_interval=0", "train.checkpoint_interval=0"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "trainer.pretrain", *common, "train.run_name=preempted"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    metrics = tmp_path / "runs" / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while _steps_logged(metrics) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-3000:]
    stopped = _steps_logged(metrics)
    assert f"preempted by SIGUSR1 at step {stopped}" in output and stopped < 300
    assert (tmp_path / "runs" / "preempted" / "checkpoints" / f"step_{stopped:08d}").is_dir()

    rerun = subprocess.run([*command, "train.exit_after_steps=3"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    resumed = {r["step"]: r["train/loss"] for r in records if "train/loss" in r and r["step"] > stopped}
    assert sorted(resumed) == [stopped + 1, stopped + 2, stopped + 3]

    straight = run(small_run("train.max_steps=300", "train.eval_interval=0", "train.checkpoint_interval=0",
                             f"train.exit_after_steps={stopped + 3}", f"train.run_dir={tmp_path / 'straight'}"))
    assert [resumed[s] for s in sorted(resumed)] == [straight.train_losses[s] for s in sorted(resumed)]


def test_unknown_signal_names_are_config_errors(small_run):
    with pytest.raises(ConfigError, match="train.preemption_signals: 'SIGNOPE' is not a signal name"):
        small_run("train.preemption_signals='SIGUSR1,SIGNOPE'")
