"""Submit a multi-node run to SLURM: `python -m launch.slurm nodes=2 gpus_per_node=8 time=02:00:00
partition=gpu [account=x] [--dry-run] parallel.tp=8 ...`.

The sbatch settings are cluster.* config fields (conf/cluster/slurm.yaml); the short arguments nodes=,
gpus_per_node=, tasks_per_node=, time=, partition=, account=, cpus_per_task= and signal_lead= set them.

As with launch.local, the trainer config is composed and validated here first, so a bad layout fails before
anything is queued. Then an sbatch script is rendered: one srun task per GPU (one per node on CPU nodes), each
running `trainer.pretrain` with the same overrides and a pinned `hydra.run.dir` so every rank, and every
requeued rerun, agrees on the run directory (and resume=auto finds its checkpoints). Ahead of the time limit
SLURM sends SIGUSR1; the ranks checkpoint and rank 0 requeues the job (launch/requeue.py).
Each task derives RANK etc. from SLURM's variables (launch.rendezvous.apply_rank_env).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launch.common import compose_for_launch, fit_layout, override_value, tensor_parallel_env
from launch.rendezvous import RANK_KEYS
from trainer.config import PLAIN_NAME, ConfigError

log = logging.getLogger(__name__)

# The launcher's short arguments, each an alias of a cluster.* field.
ALIASES = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node",
           "time": "time_limit", "partition": "partition", "account": "account",
           "cpus_per_task": "cpus_per_task", "signal_lead": "signal_lead_s"}


def split_launcher_args(argv: list[str]) -> tuple[bool, list[str]]:
    """(--dry-run given, the trainer overrides); `time=02:00:00` etc. become cluster.* overrides."""
    dry_run, overrides = False, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if arg == "--dry-run":
            dry_run = True
        elif key in ALIASES:
            overrides.append(f"cluster.{ALIASES[key]}={value}")
        elif arg.startswith("--"):
            raise ConfigError(f"{arg}: unknown option (only --dry-run)")
        else:
            overrides.append(arg)
    if override_value(overrides, "cluster") is None:
        overrides.insert(0, "cluster=slurm")
    return dry_run, overrides


def resolve_job(overrides: list[str]):
    """Validate the config for nodes * ranks_per_node ranks; return (config, overrides with parallel.dp explicit)."""
    config = compose_for_launch(overrides)
    config, overrides = fit_layout(overrides, config.cluster.nodes * config.cluster.ranks_per_node,
                                   f"{_world_text(config)} ranks", config)
    if not PLAIN_NAME.match(config.train.run_name):
        raise ConfigError(f"train.run_name={config.train.run_name!r}: must be usable as a directory name")
    return config, overrides


def _world_text(config) -> str:
    cluster = config.cluster
    per_node = "tasks_per_node" if cluster.tasks_per_node else "gpus_per_node" if cluster.gpus_per_node else None
    if per_node is None:
        return f"{cluster.nodes} CPU node(s), 1 rank each: {cluster.nodes}"
    count = getattr(cluster, per_node)
    return f"cluster.nodes*{per_node} = {cluster.nodes}*{count} = {cluster.nodes * count}"


def job_run_dir(config, overrides: list[str]) -> str:
    """`runs/<train.run_name>`, as conf/config.yaml would pick, unless hydra.run.dir is given."""
    return override_value(overrides, "hydra.run.dir") or f"runs/{config.train.run_name}"


def render_script(config, overrides: list[str], python: str = sys.executable, workdir: str | None = None,
                  env: dict[str, str] | None = None) -> str:
    """The sbatch script for this run; `overrides` are passed to every rank of trainer.pretrain."""
    env = os.environ if env is None else env
    run_dir = job_run_dir(config, overrides)
    cluster = config.cluster
    gpus = cluster.gpus_per_node
    sbatch = [
        f"--job-name={config.train.run_name}",
        f"--nodes={cluster.nodes}",
        f"--ntasks-per-node={cluster.ranks_per_node}",
        *([f"--gpus-per-node={gpus}"] if gpus else []),
        f"--cpus-per-task={cluster.cpus_per_task}",
        *([f"--time={cluster.time_limit}"] if cluster.time_limit else []),
        *([f"--partition={cluster.partition}"] if cluster.partition else []),
        *([f"--account={cluster.account}"] if cluster.account else []),
        f"--chdir={workdir or os.getcwd()}",
        f"--output={run_dir}/slurm-%j.out",
        f"--error={run_dir}/slurm-%j.out",
        f"--signal=USR1@{cluster.signal_lead_s}",
        "--requeue",
        # A requeued job appends to the same log instead of truncating the first attempt's.
        "--open-mode=append",
    ]
    exports = {
        "OMP_NUM_THREADS": str(cluster.cpus_per_task),
        "NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "PYTHONUNBUFFERED": "1",
        **tensor_parallel_env(config),
        **({"WANDB_MODE": env["WANDB_MODE"]} if env.get("WANDB_MODE") else {}),
    }
    pinned = [o for o in overrides if o.split("=", 1)[0].lstrip("+") != "hydra.run.dir"]
    command = [python, "-m", "trainer.pretrain", *pinned, f"hydra.run.dir={run_dir}"]
    lines = [
        "#!/bin/bash",
        "# Written by launch.slurm; resubmit with `sbatch` on this file.",
        *(f"#SBATCH {option}" for option in sbatch),
        "",
        *(f"export {key}={shlex.quote(value)}" for key, value in exports.items()),
        # sbatch passes on the submitting shell's environment; its rank variables, if any, are not the job's.
        f"unset {' '.join(RANK_KEYS)}",
        "",
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        "# On SIGUSR1 or SIGTERM every rank checkpoints, then rank 0 requeues this job",
        "# (train.requeue_on_preemption); the rerun resumes from that checkpoint.",
        "srun --kill-on-bad-exit=1 " + shlex.join(command),
    ]
    return "\n".join(lines) + "\n"


def submit(script_path: Path) -> str:
    """Run sbatch on the script; return the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise FileNotFoundError(f"sbatch not found on PATH; the job script is at {script_path} "
                                "(submit it on a SLURM login node, or use --dry-run to print it)")
    result = subprocess.run([sbatch, str(script_path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {script_path} failed ({result.returncode}): {result.stderr.strip()}")
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    if match is None:
        raise RuntimeError(f"sbatch {script_path}: no job id in its output {result.stdout.strip()!r}")
    return match.group(1)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    try:
        dry_run, overrides = split_launcher_args(sys.argv[1:] if argv is None else argv)
        config, overrides = resolve_job(overrides)
    except ConfigError as err:
        log.error("config error: %s", err)
        return 2
    script = render_script(config, overrides)
    if dry_run:
        sys.stdout.write(script)
        return 0
    run_dir = job_run_dir(config, overrides)
    script_path = Path(run_dir, "job.sbatch")
    # SLURM opens --output before the job starts and does not create its directory.
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    try:
        job_id = submit(script_path)
    except (FileNotFoundError, RuntimeError) as err:
        log.error("%s", err)
        return 1
    log.info("submitted job %s: %s; log in %s/slurm-%s.out", job_id, script_path, run_dir, job_id)
    sys.stdout.write(f"{job_id}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
