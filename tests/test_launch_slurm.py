"""SLURM launching without SLURM: node lists, rank variables, the rendered sbatch script, the CLI."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launch.rendezvous import (
    apply_rank_env,
    expand_nodelist,
    free_port,
    job_port,
    resolve_rank_env,
    started_by_launcher,
)
from launch.slurm import render_script, resolve_job, split_launcher_args

EXAMPLE = ["cluster=slurm", "nodes=2", "gpus_per_node=8", "time=02:00:00", "partition=gpu", "account=x",
           "model=gpt3-1.3b", "parallel.tp=8", "train.max_steps=1000"]


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("host", ["host"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu-a[1-2],gpu-b5", ["gpu-a1", "gpu-a2", "gpu-b5"]),
        ("a,b[9-10],c", ["a", "b9", "b10", "c"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("n[008-010].cluster", ["n008.cluster", "n009.cluster", "n010.cluster"]),
    ],
)
def test_nodelists_expand(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-03", "node]1[", "node[a-b]", "node[3-1]", "", "n[[1]]"])
def test_bad_nodelists_are_named(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(nodelist)


SLURM_ENV = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu-a[07-08]", "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0"}


def test_slurm_variables_give_the_rank_and_first_host():
    assert resolve_rank_env(SLURM_ENV) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                           "MASTER_ADDR": "gpu-a07", "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_port_is_derived_from_the_job_id_unless_given():
    assert job_port("123456") == job_port("123456") == 23456
    assert job_port("40000") == 20000
    env = {**SLURM_ENV, "MASTER_PORT": "29500", "MASTER_ADDR": "login1"}
    assert resolve_rank_env(env)["MASTER_PORT"] == "29500"
    assert resolve_rank_env(env)["MASTER_ADDR"] == "login1"


def test_torchrun_variables_win_over_slurm():
    # Under `srun torchrun`, every worker sees SLURM_PROCID=0; torchrun's RANK is the real one.
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}
    assert resolve_rank_env({**SLURM_ENV, "SLURM_PROCID": "0", **torchrun}) == torchrun


@pytest.mark.parametrize("missing", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST",
                                     "SLURM_JOB_ID"])
def test_a_missing_variable_is_named(missing):
    env = {k: v for k, v in SLURM_ENV.items() if k != missing}
    with pytest.raises(ValueError, match=f"{missing} is not set"):
        resolve_rank_env(env)


def test_partial_torchrun_variables_are_named():
    with pytest.raises(ValueError, match="MASTER_PORT is not set"):
        resolve_rank_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "h"})


def test_apply_rank_env_sets_the_variables():
    env = dict(SLURM_ENV)
    apply_rank_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("9", "16", "gpu-a07")


def test_a_process_in_the_batch_step_is_a_job_of_one():
    # `python -m trainer.pretrain` run straight from an sbatch script (no srun) sees SLURM_PROCID=0 and the
    # job's SLURM_NTASKS but no step id: it must not wait for ranks that nobody starts.
    batch_step = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_STEP_ID"}
    env = dict(batch_step)
    assert not started_by_launcher(batch_step) and apply_rank_env(env) is None and env == batch_step
    assert started_by_launcher(SLURM_ENV) and started_by_launcher({"RANK": "0", "MASTER_ADDR": "h"})
    assert not started_by_launcher({"MASTER_ADDR": "h", "MASTER_PORT": "1"})
    # What a lone process leaves in its environment for DeepSpeed, and its children inherit.
    assert not started_by_launcher({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})


def _render(argv: list[str]) -> str:
    _, overrides = split_launcher_args(argv)
    config, overrides = resolve_job(overrides)
    return render_script(config, overrides, python="python", workdir="/work/repo", env={"WANDB_MODE": "online"})


def test_two_node_script_has_the_sbatch_lines_srun_and_requeue():
    script = _render(EXAMPLE)
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=x", "#SBATCH --output=runs/gpt3-1.3b/slurm-%j.out",
                 "#SBATCH --error=runs/gpt3-1.3b/slurm-%j.out", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --chdir=/work/repo", "export OMP_NUM_THREADS=8",
                 "export NCCL_ASYNC_ERROR_HANDLING=1", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "export PYTHONUNBUFFERED=1", "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export WANDB_MODE=online",
                 "unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT",
                 "srun --kill-on-bad-exit=1 python -m trainer.pretrain cluster=slurm cluster.nodes=2 "
                 "cluster.gpus_per_node=8 cluster.time_limit=02:00:00 cluster.partition=gpu cluster.account=x "
                 "model=gpt3-1.3b parallel.tp=8 train.max_steps=1000 parallel.dp=2 "
                 "hydra.run.dir=runs/gpt3-1.3b"]:
        assert line in script.splitlines(), line
    # The trainer requeues the job itself (launch/requeue.py), not the script on srun's exit status.
    assert "scontrol requeue" not in script and script.rstrip().endswith("hydra.run.dir=runs/gpt3-1.3b")


def test_cpu_nodes_run_one_task_each_and_options_are_honoured():
    script = _render(["nodes=3", "gpus_per_node=0", "cpus_per_task=4", "signal_lead=300", "parallel.dp=3",
                      "train.preemption_exit_code=99", "train.run_name=cpu-job"])
    lines = script.splitlines()
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --cpus-per-task=4" in lines
    assert not any("gpus-per-node" in line for line in lines) and not any("--time" in line for line in lines)
    assert "#SBATCH --signal=USR1@300" in lines
    assert not any("CUDA_DEVICE_MAX_CONNECTIONS" in line for line in lines)  # tp=1: nothing to overlap
    assert "export OMP_NUM_THREADS=4" in lines and "#SBATCH --output=runs/cpu-job/slurm-%j.out" in lines
    assert "cluster=slurm" in script  # chosen when not given


def test_several_cpu_ranks_per_node_with_tasks_per_node():
    script = _render(["nodes=2", "gpus_per_node=0", "tasks_per_node=4", "cpus_per_task=2", "train.run_name=cpu4"])
    lines = script.splitlines()
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert not any("gpus-per-node" in line for line in lines)
    assert "cluster.tasks_per_node=4" in script and "parallel.dp=8" in script


def test_overrides_are_shell_quoted():
    script = _render([*EXAMPLE, "train.run_name=quoted", "+logging.wandb_entity=a b"])
    assert "'+logging.wandb_entity=a b'" in script


def cli(args: list[str], cwd: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_dry_run_prints_the_script(tmp_path):
    result = cli([*EXAMPLE, "--dry-run"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=2" in result.stdout and "hydra.run.dir=runs/gpt3-1.3b" in result.stdout
    assert f"#SBATCH --chdir={tmp_path}" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["parallel.tp=3"], "parallel.tp=3: must divide model.n_head=32"),
        (["parallel.dp=3"], "cluster.nodes*gpus_per_node = 2*8 = 16 ranks but parallel.tp*pp*dp = 8*1*3 = 24"),
        (["time=soon"], "cluster.time_limit='soon': must be like 90, 02:00:00 or 1-12:00:00"),
        (["partition=a/b"], "cluster.partition='a/b': must be a plain SLURM name"),
        (["optim.lr=("], "optim.lr: cannot parse 'optim.lr=(': extraneous input '('"),
        (["model.n_headz=4"], "model.n_headz: unknown key; did you mean model.n_head?"),
        (["+train.max_step=5"], "train.max_step: unknown key; did you mean train.max_steps?"),
        (["nodes=0"], "cluster.nodes=0: must be >= 1"),
        (["tasks_per_node=4"], "cluster.tasks_per_node=4: must equal cluster.gpus_per_node=8 (one rank per GPU)"),
        (["gpus_per_node=0", "tasks_per_node=3", "parallel.dp=4"],
         "cluster.nodes*tasks_per_node = 2*3 = 6 ranks but parallel.tp*pp*dp = 8*1*4 = 32"),
    ],
)
def test_bad_config_fails_before_rendering(args, message, tmp_path):
    result = cli([*EXAMPLE, *args, "--dry-run"], tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"ERROR] config error: {message}" in lines[0], result.stderr[-2000:]
    assert result.stdout == ""


def test_missing_sbatch_is_a_clear_error(tmp_path):
    # PATH holds only a directory without sbatch; the interpreter is started by its full path.
    empty = tmp_path / "bin"
    empty.mkdir()
    result = cli(EXAMPLE, tmp_path, path=str(empty))
    assert result.returncode == 1
    assert "sbatch not found on PATH" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "runs" / "gpt3-1.3b" / "job.sbatch").read_text().startswith("#!/bin/bash")


def test_submission_writes_the_script_and_prints_the_job_id(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text('#!/bin/sh\necho "$1" > "$(dirname "$0")/submitted"\necho "Submitted batch job 4242"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = cli(EXAMPLE, tmp_path, path=f"{bin_dir}:/usr/bin:/bin")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "4242"
    assert (bin_dir / "submitted").read_text().strip() == "runs/gpt3-1.3b/job.sbatch"
    assert (tmp_path / "runs" / "gpt3-1.3b" / "job.sbatch").exists()


def test_a_given_run_dir_is_kept_for_logs_and_ranks():
    script = _render([*EXAMPLE, "hydra.run.dir=/scratch/run7"])
    assert "#SBATCH --output=/scratch/run7/slurm-%j.out" in script
    assert script.count("hydra.run.dir=") == 1 and "hydra.run.dir=/scratch/run7\n" in script


_JOIN = """
import torch.distributed as dist
from launch.rendezvous import apply_rank_env
env = apply_rank_env()
dist.init_process_group("gloo")  # env://, as trainer.parallel.topology does once MASTER_ADDR is set
t = __import__("torch").ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
print(env["RANK"], env["LOCAL_RANK"], dist.get_world_size(), int(t.item()))
dist.destroy_process_group()
"""


def test_srun_style_ranks_join_one_gloo_group(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="77", SLURM_STEP_ID="0",
                   SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", _JOIN], env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == ["0 0 2 3", "1 1 2 3"]


def test_only_rank_0_of_a_slurm_job_step_requeues_it(tmp_path, monkeypatch):
    from launch.requeue import requeue_own_job

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    step = {"SLURM_JOB_ID": "31", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "RANK": "0"}
    assert requeue_own_job({**step, "RANK": "1"}) is None  # e.g. `srun torchrun`: torchrun's rank decides
    assert requeue_own_job({k: v for k, v in step.items() if k != "SLURM_STEP_ID"}) is None  # the batch step
    assert requeue_own_job({"RANK": "0", "MASTER_ADDR": "h"}) is None  # not in SLURM
    assert requeue_own_job(step) == "31"
    assert (bin_dir / "calls").read_text() == "requeue 31\n"
    fake.write_text("#!/bin/sh\necho 'Requeue of job 31 not allowed' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="scontrol requeue 31 failed: Requeue of job 31 not allowed"):
        requeue_own_job(step)
