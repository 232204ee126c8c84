"""A preemption warning stops the run after the current step with a checkpoint; the rerun continues the curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import SMALL_RUN, small_corpus_args
from trainer.checkpoint import checkpoint_problem
from trainer.config import ConfigError
from trainer.preemption import Preempted
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


@contextmanager
def signals_caught_outside_the_run(*signals: signal.Signals):
    """Handlers that record the signals the run's own handlers did not take (on a signal's default action
    pytest itself would die); yields the list of those that got through."""
    escaped: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: escaped.append(signum)) for sig in signals}
    try:
        yield escaped
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_second_signal_during_the_final_save_is_noted_not_fatal(small_run, monkeypatch, caplog):
    from trainer import checkpoint

    original, calls = checkpoint.save_file, []

    def save_file_under_signals(tensors, path):
        calls.append(path)
        if len(calls) == 1:  # writing step 1's weights: SIGUSR1, which stops the run after step 2
            os.kill(os.getpid(), signal.SIGUSR1)
        if len(calls) == 3:  # writing the weights of the checkpoint that stop saves: SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
        original(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file_under_signals)
    with signals_caught_outside_the_run(signal.SIGUSR1, signal.SIGTERM) as escaped:
        with pytest.raises(Preempted) as stop:
            run(small_run("train.max_steps=6", "train.eval_interval=0", "train.checkpoint_interval=1"))
    assert escaped == []  # both were the run's: neither reached the default action (death, a `.tmp` left)
    assert stop.value.signal_name == "SIGUSR1" and stop.value.step == 2
    final = Path(stop.value.checkpoint)
    assert final.name == "step_00000002" and checkpoint_problem(final) is None
    assert not list(final.parent.glob("*.tmp"))
    assert "SIGTERM received while already stopping for SIGUSR1: noted" in caplog.text


def test_a_signal_during_start_up_stops_at_the_first_safe_point(small_run, monkeypatch):
    import trainer.run

    prepare = trainer.run._prepare_data

    def prepare_under_signal(config, topo):
        os.kill(os.getpid(), signal.SIGUSR1)  # the scheduler's warning arrives while the data is prepared
        return prepare(config, topo)

    monkeypatch.setattr(trainer.run, "_prepare_data", prepare_under_signal)
    monkeypatch.setattr(trainer.run, "build_model", lambda *args: pytest.fail("model built after the signal"))
    with signals_caught_outside_the_run(signal.SIGUSR1) as escaped:
        with pytest.raises(Preempted, match="preempted by SIGUSR1 at step 0; no checkpoint"):
            run(small_run("train.max_steps=3"))
    assert escaped == []


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `sig` (Linux: the SigCgt mask of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the signal mask from /proc (Linux)")
def test_a_signal_during_the_imports_exits_for_requeue_instead_of_killing_the_job(small_corpus, tmp_path):
    command = [sys.executable, "-m", "trainer.pretrain", *SMALL_RUN, *small_corpus_args(small_corpus),
               "train.max_steps=3", "train.run_name=early"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    # As soon as the handlers are in, that is before the heavy imports and any start-up work.
    deadline = time.monotonic() + 60
    while process.poll() is None and not _catches(process.pid, signal.SIGUSR1) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-3000:]
    assert "preempted by SIGUSR1 at step 0; no checkpoint (nothing trained yet)" in output
    assert not (tmp_path / "runs" / "early" / "checkpoints").exists()
