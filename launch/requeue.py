"""Queue a preempted SLURM job again, from inside it, once its checkpoint is written.

After a preemption warning every rank finishes the same step and the checkpoint is complete on all of them
(the save ends with a barrier); then rank 0 runs `scontrol requeue` on its own job, and SLURM stops the
job and queues it again with SLURM_RESTART_COUNT incremented. The rerun resumes from that checkpoint.
This works the same under launch.slurm's sbatch script and under Hydra's submitit launcher. It does not
depend on srun's exit status: with --kill-on-bad-exit, the first rank to exit with the preemption status
gets the slower ones killed, and srun then reports their signal rather than that status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

from launch.rendezvous import in_srun_task


def requeue_own_job(env: Mapping[str, str] | None = None) -> str | None:
    """On global rank 0 of a SLURM job step, `scontrol requeue` the job; return its id (else None)."""
    env = os.environ if env is None else env
    if not (in_srun_task(env) and env.get("SLURM_JOB_ID")) or env.get("RANK", env["SLURM_PROCID"]) != "0":
        return None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RuntimeError("scontrol not found on PATH: cannot requeue the preempted job")
    job_id = env["SLURM_JOB_ID"]
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {result.stderr.strip()}")
    return job_id
