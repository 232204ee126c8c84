"""Queue a preempted SLURM job again when no job script does it: the Hydra submitit launcher's jobs.

launch.slurm's sbatch script requeues on the trainer's preemption exit status. Under Hydra's submitit
launcher the trainer catches submitit's signal itself (to checkpoint at a step boundary on every rank),
so submitit's own handler never runs; rank 0 then asks SLURM to requeue the job, and submitit's rerun of
the same Hydra job resumes from the checkpoint in the same sweep directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping


def under_submitit(env: Mapping[str, str]) -> bool:
    return env.get("SUBMITIT_EXECUTOR") == "slurm" and bool(env.get("SLURM_JOB_ID"))


def requeue_submitit_job(env: Mapping[str, str] | None = None) -> str | None:
    """On rank 0 of a submitit SLURM job, `scontrol requeue` it; return its id (None when not applicable)."""
    env = os.environ if env is None else env
    if not under_submitit(env) or env.get("RANK", env.get("SLURM_PROCID", "0")) != "0":
        return None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RuntimeError("scontrol not found on PATH: cannot requeue the preempted submitit job")
    job_id = env["SLURM_JOB_ID"]
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {result.stderr.strip()}")
    return job_id
