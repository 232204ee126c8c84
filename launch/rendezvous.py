"""Where a process sits in the job, for every launcher: torchrun (launch.local), srun (launch.slurm, submitit).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT itself. `srun` starts one task per rank
and sets only SLURM_* variables, so each task derives the torch ones: its rank from SLURM_PROCID, the
rendezvous host from the first node of SLURM_JOB_NODELIST (the same on every node, with no `scontrol`
call), and a port from the job id so every rank of a job agrees without talking first. A process that no
launcher started (plain `python -m trainer.pretrain`, also inside an sbatch script's batch step) is a
job of one.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from collections.abc import Mapping, MutableMapping

RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Ports 20000..39999: above most services' fixed ports, below Linux's ephemeral range (32768+ overlaps,
# but a clash needs the same job-id residue on the same first node; MASTER_PORT overrides it).
PORT_BASE, PORT_SPAN = 20000, 20000

_GROUP = re.compile(r"\[([^\[\]]*)\]")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: `a[1,2],b` -> [`a[1,2]`, `b`]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"SLURM_JOB_NODELIST={text!r}: unbalanced brackets")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"SLURM_JOB_NODELIST={text!r}: unbalanced brackets")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_ranges(body: str, nodelist: str) -> list[str]:
    """`01-03,07` -> [01, 02, 03, 07]; zero padding follows the range's first number."""
    values = []
    for item in body.split(","):
        low, _, high = item.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: bad range {item!r}")
        stop = int(high) if high else int(low)
        if stop < int(low):
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: descending range {item!r}")
        values += [str(n).zfill(len(low)) for n in range(int(low), stop + 1)]
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a compressed SLURM node list: `node[01-03,07]`, `gpu-a[1-2],gpu-b5`, `host`."""
    hosts = []
    for part in _split_top_level(nodelist):
        pieces = _GROUP.split(part)  # literal, range body, literal, range body, ..., literal
        if "[" in "".join(pieces[::2]) or "]" in "".join(pieces[::2]):
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets")
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, nodelist) for i, p in enumerate(pieces)]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: no hosts")
    return hosts


def job_port(job_id: str) -> int:
    """A rendezvous port every rank of the job computes alike from SLURM_JOB_ID."""
    if not job_id.isdigit():
        # Array tasks report e.g. `123_4` in some places; keep the digits so the port stays deterministic.
        digits = "".join(c for c in job_id if c.isdigit())
        if not digits:
            raise ValueError(f"SLURM_JOB_ID={job_id!r}: not a job number")
        job_id = digits
    return PORT_BASE + int(job_id) % PORT_SPAN


def _require(env: Mapping[str, str], key: str, why: str) -> str:
    value = env.get(key)
    if value is None or value == "":
        raise ValueError(f"{key} is not set: {why}")
    return value


def resolve_rank_env(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for this process; torchrun's win over SLURM's."""
    # Under `srun torchrun ...` every worker sees SLURM_PROCID=0, so torchrun's RANK must win.
    if _torchrun(env):
        why = "RANK and MASTER_ADDR are set (torchrun), so the other torchrun variables must be too"
        return {key: _require(env, key, why) for key in RANK_KEYS}
    why = "needed to derive the rank outside torchrun (start the job with srun, or set RANK etc.)"
    resolved = {
        "RANK": _require(env, "SLURM_PROCID", why),
        "WORLD_SIZE": _require(env, "SLURM_NTASKS", why),
        "LOCAL_RANK": _require(env, "SLURM_LOCALID", why),
    }
    if env.get("MASTER_ADDR"):
        resolved["MASTER_ADDR"] = env["MASTER_ADDR"]
    else:
        resolved["MASTER_ADDR"] = expand_nodelist(_require(env, "SLURM_JOB_NODELIST", why))[0]
    if env.get("MASTER_PORT"):
        resolved["MASTER_PORT"] = env["MASTER_PORT"]
    else:
        resolved["MASTER_PORT"] = str(job_port(_require(env, "SLURM_JOB_ID", why)))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if not resolved[key].isdigit():
            raise ValueError(f"{key}={resolved[key]!r}: must be a non-negative integer")
    return resolved


def _torchrun(env: Mapping[str, str]) -> bool:
    # torchrun sets both. RANK alone is what a lone process leaves for DeepSpeed (RANK=0, WORLD_SIZE=1),
    # and its child processes inherit it: that is not a launcher's rank.
    return bool(env.get("RANK")) and bool(env.get("MASTER_ADDR"))


def in_srun_task(env: Mapping[str, str]) -> bool:
    """A task of an srun job step (launch.slurm's script and submitit both start ranks with srun).

    A process in an sbatch script's batch step also sees SLURM_PROCID=0 and the job's SLURM_NTASKS, but no
    SLURM_STEP_ID: it is not one of the job's ranks.
    """
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


def started_by_launcher(env: Mapping[str, str]) -> bool:
    """True under torchrun (RANK and MASTER_ADDR) or in an srun task; a process in an sbatch script's batch
    step is not one of the job's ranks: taking it for rank 0 would wait forever for ranks nobody starts."""
    return _torchrun(env) or in_srun_task(env)


def apply_rank_env(env: MutableMapping[str, str] | None = None) -> dict[str, str] | None:
    """Set the torch rank variables in `env` (os.environ by default) from torchrun's or srun's; return them.

    None for a process that no launcher started (see started_by_launcher): it needs no rendezvous.
    """
    env = os.environ if env is None else env
    if not started_by_launcher(env):
        return None
    resolved = resolve_rank_env(env)
    env.update(resolved)
    return resolved


def slurm_job_text(env: Mapping[str, str] | None = None) -> str | None:
    """`SLURM job 42 on node[1-2], SLURM_RESTART_COUNT=1` inside a SLURM job, else None (for the run log)."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None
    return (f"SLURM job {env['SLURM_JOB_ID']} on {env.get('SLURM_JOB_NODELIST', '?')}, "
            f"SLURM_RESTART_COUNT={env.get('SLURM_RESTART_COUNT', '0')}")


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (torchrun's rendezvous for launch.local)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
