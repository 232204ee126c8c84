"""Jobs on a real SLURM cluster on localhost: launch.slurm (a 2-task job, preemption and requeue, a dead rank)
and Hydra's submitit launcher (a sweep; a 2-rank job preempted and requeued).

The cluster (munged, slurmctld, slurmd; one node claiming 4 CPUs) is installed and started by the module
fixture and stopped by PID at the end (tests/slurm_cluster.py). Each job trains the tiny model with 2 ranks
(data parallel, ZeRO-0, fp32) on the small corpus; its losses are compared with the same run started by
launch.local: the ranks do the same arithmetic and gloo sums two numbers alike, so they must be equal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.rendezvous import RANK_KEYS
from tests.conftest import SMALL_RUN, logged, small_corpus_args
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# 200 steps of ~10 ms: ~2 s of training, 40 logged losses to compare. A preemption signal is sent once step
# SIGNAL_AFTER is logged, leaving ~190 steps (~2 s, more on a busy machine) for it to land mid-run; SLURM
# delivers it in well under a second.
STEPS = 200
SIGNAL_AFTER = 10
TRAIN = [f"train.max_steps={STEPS}", "train.log_interval=5", "train.eval_interval=0", "train.checkpoint_interval=0"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=4)
    try:
        cluster.start()
    except SlurmUnavailable as err:
        cluster.stop()
        if os.geteuid() != 0:
            pytest.skip(f"no SLURM cluster here: {err}")
        raise
    yield cluster
    cluster.stop()


def _env(**extra: str) -> dict[str, str]:
    # Rank variables that in-process runs of other tests left in os.environ are not for these jobs.
    clean = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}
    return {**clean, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra}


def _overrides(small_corpus: Path, run_name: str, *extra: str) -> list[str]:
    return [*SMALL_RUN, *small_corpus_args(small_corpus), *TRAIN, f"train.run_name={run_name}", *extra]


def submit(slurm: LocalSlurm, cwd: Path, overrides: list[str]) -> str:
    """`python -m launch.slurm` for 2 CPU tasks on the one node; returns the job id it prints."""
    command = [sys.executable, "-m", "launch.slurm", "nodes=1", "gpus_per_node=0", "tasks_per_node=2",
               "cpus_per_task=1", "time=10", *overrides]
    result = subprocess.run(command, cwd=cwd, env=_env(**slurm.env), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def wait_for_end(slurm: LocalSlurm, job_id: str, timeout: float = 240, release_requeued: bool = False) -> dict:
    """Poll until the job ends; a requeued job held by SLURM's ~120 s BeginTime is released early if asked.

    Not at once: slurmd refuses a job whose credential is from the same second as the revoked one of its
    previous run ("Job credential revoked"), so the release waits a few seconds.
    """
    deadline = time.monotonic() + timeout
    held_since = None
    while time.monotonic() < deadline:
        job = slurm.job(job_id)
        if job["JobState"] in TERMINAL:
            return job
        if release_requeued and job["JobState"] == "PENDING" and job.get("Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since > 3:
                slurm.scontrol("update", f"JobId={job_id}", "StartTime=now")
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {slurm.job(job_id)['JobState']} after {timeout:.0f} s")


def wait_for_steps(metrics: Path, steps: int, slurm: LocalSlurm, job_id: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(logged(metrics), default=0) >= steps:
            return
        assert slurm.job(job_id)["JobState"] not in TERMINAL, f"job {job_id} ended before step {steps}"
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach step {steps} in {timeout:.0f} s")


def job_log(cwd: Path, run_name: str, job_id: str) -> str:
    return (cwd / "runs" / run_name / f"slurm-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def local_losses(small_corpus, tmp_path_factory) -> dict[int, float]:
    """The same 2-rank run started by launch.local (torchrun), uninterrupted."""
    cwd = tmp_path_factory.mktemp("local")
    command = [sys.executable, "-m", "launch.local", "nproc=2", *_overrides(small_corpus, "local")]
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = logged(cwd / "runs" / "local" / "metrics.jsonl")
    assert max(losses) == STEPS
    return losses


def test_a_two_task_job_trains_like_a_local_two_process_run(slurm, small_corpus, local_losses, tmp_path):
    job_id = submit(slurm, tmp_path, _overrides(small_corpus, "two"))
    job = wait_for_end(slurm, job_id)
    log = job_log(tmp_path, "two", job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "rank 1/2: tp 0/1 pp 0/1 dp 1/2" in log  # both ranks joined one group from SLURM's variables
    assert logged(tmp_path / "runs" / "two" / "metrics.jsonl") == local_losses


def test_preemption_checkpoints_requeues_and_ends_with_the_same_loss(slurm, small_corpus, local_losses, tmp_path):
    job_id = submit(slurm, tmp_path, _overrides(small_corpus, "preempted"))
    metrics = tmp_path / "runs" / "preempted" / "metrics.jsonl"
    wait_for_steps(metrics, SIGNAL_AFTER, slurm, job_id)
    # What `#SBATCH --signal=USR1@120` does ahead of the time limit: SIGUSR1 to every task of the job step.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm.env, check=True, timeout=60)
    job = wait_for_end(slurm, job_id, release_requeued=True)
    log = job_log(tmp_path, "preempted", job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]

    stopped = int(re.search(r"preempted by SIGUSR1 at step (\d+)", log).group(1))
    assert SIGNAL_AFTER <= stopped < STEPS  # mid-run: losses logged before the stop and after the resume
    assert f"requeued SLURM job {job_id}" in log  # by rank 0 of the trainer, after the checkpoint
    assert f"job {job_id} (restart 1)" in log and "SLURM_RESTART_COUNT=1" in log
    assert f"resumed from {tmp_path}/runs/preempted/checkpoints/step_{stopped:08d}" in log
    losses = logged(metrics)
    assert losses == local_losses  # before the stop and after the resume, to the last step
    assert sorted(losses) == sorted(set(losses))


def test_a_killed_rank_fails_the_job_fast_and_is_named(slurm, small_corpus, tmp_path):
    job_id = submit(slurm, tmp_path, _overrides(small_corpus, "killed", "train.max_steps=100000",
                                                "cluster.collective_timeout_s=60"))
    wait_for_steps(tmp_path / "runs" / "killed" / "metrics.jsonl", 10, slurm, job_id)
    rank_1 = task_pid(slurm, job_id, global_rank=1)
    os.kill(rank_1, 9)
    killed = time.monotonic()
    job = wait_for_end(slurm, job_id, timeout=120)
    assert time.monotonic() - killed < 30  # well inside the collective timeout: nothing hung
    log = job_log(tmp_path, "killed", job_id)
    assert job["JobState"] == "FAILED", log[-3000:]
    assert "task 1: Killed" in log, log[-3000:]  # srun names the rank and how it died
    # The surviving rank says what happened in one line, without a library traceback.
    assert "rank 0/2: a collective failed" in log and "Another rank has likely died" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def task_pid(slurm: LocalSlurm, job_id: str, global_rank: int) -> int:
    """The PID of one rank of the job's first srun step, from `scontrol listpids`."""
    listing = slurm.scontrol("listpids", job_id).stdout.splitlines()
    for row in listing[1:]:
        pid, _job, step, _local, rank = row.split()
        if step == "0" and rank == str(global_rank):
            return int(pid)
    raise AssertionError(f"rank {global_rank} of job {job_id} not in scontrol listpids:\n" + "\n".join(listing))


def sweep(slurm: LocalSlurm, cwd: Path, args: list[str]) -> subprocess.Popen:
    """`python -m trainer.pretrain -m ...` in the background; Hydra's submitit launcher waits for its jobs."""
    command = [sys.executable, "-m", "trainer.pretrain", "-m", *args]
    return subprocess.Popen(command, cwd=cwd, env=_env(**slurm.env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_submitit_sweep_runs_each_job_on_slurm(slurm, small_corpus, tmp_path):
    # The plugin's own launcher, one task per job, as a user would type it.
    process = sweep(slurm, tmp_path, ["hydra/launcher=submitit_slurm", "optim.lr=1e-3,2e-3",
                                      *_overrides(small_corpus, "sweep", "train.max_steps=10")])
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    runs = tmp_path / "multirun" / "sweep"
    for job, lr in (("job0", "optim.lr=0.001"), ("job1", "optim.lr=0.002")):
        assert lr in (runs / job / ".hydra" / "overrides.yaml").read_text()
        assert max(logged(runs / job / "metrics.jsonl")) == 10
    logs = "".join(p.read_text() for p in (runs / ".submitit").glob("*/*_log.out"))
    assert logs.count("SLURM job ") == 2  # each job ran under SLURM, not in this process


def test_a_submitit_job_of_two_ranks_is_preempted_requeued_and_matches(slurm, small_corpus, local_losses, tmp_path):
    process = sweep(slurm, tmp_path, ["hydra/launcher=submitit_cluster", "cluster.tasks_per_node=2",
                                      "parallel.dp=2", *_overrides(small_corpus, "swept")])
    metrics = tmp_path / "multirun" / "swept" / "job0" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while max(logged(metrics), default=0) < SIGNAL_AFTER:
        assert process.poll() is None and time.monotonic() < deadline, "the submitit job did not start training"
        time.sleep(0.1)
    running = subprocess.run(["squeue", "--noheader", "--states=RUNNING", "--format=%A"], env=slurm.env,
                             capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert len(running) == 1, running
    job_id = running[0]
    # submitit asks SLURM for SIGUSR2 ahead of the time limit; the trainer takes it as its preemption warning.
    subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm.env, check=True, timeout=60)
    job = wait_for_end(slurm, job_id, release_requeued=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1")
    rank_0 = next((tmp_path / "multirun" / "swept" / ".submitit").glob("*/*_0_log.out")).read_text()
    assert "requeued SLURM job" in rank_0 and "SLURM_RESTART_COUNT=1" in rank_0, rank_0[-3000:]
    assert logged(metrics) == local_losses
