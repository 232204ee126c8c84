"""One place that starts torch.distributed, megatron-core's parallel_state and the mpu DeepSpeed expects.

Rank order is megatron-core's default: tp fastest, then dp, then pp; DeepSpeed's
PipeModelDataParallelTopology (axes pipe, data, model) orders ranks the same way.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from launch.rendezvous import apply_rank_env
from trainer.config import ConfigError, ParallelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    """This rank's place in the tp x pp x dp grid, and its device."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def layout(self) -> dict[str, int]:
        """The parallel layout, as checkpoints record it."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp} pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp}"


class MegatronMPU:
    """The `mpu` interface DeepSpeed calls, answered from megatron-core's parallel_state."""

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()


def resolve_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA on a machine without it is an error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda': no CUDA device is visible on this machine")
    if requested == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _start_process_group(device: torch.device, timeout: timedelta, launched: bool) -> None:
    """Join the job's process group (env:// from torchrun/srun), or make a one-process group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():  # a group stays up for reuse, e.g. by the next job of an in-process sweep
        _init_torch_process_group(device, backend, timeout, launched)
    # DeepSpeed's communication layer adopts the existing group (its pipeline module asks it for ranks).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


def _init_torch_process_group(device: torch.device, backend: str, timeout: timedelta, launched: bool) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched:  # started by torchrun / srun: rendezvous through MASTER_ADDR:MASTER_PORT
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    # A lone process needs no rendezvous: an in-memory store, so no port can be taken by someone else.
    # (DeepSpeed still reads the rank variables a launcher would have set.)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def init_topology(parallel: ParallelConfig, device_name: str = "auto", collective_timeout_s: int = 600) -> Topology:
    """Start the process groups for the configured layout and return this rank's coordinates."""
    # torchrun's rank variables, or derived from srun's SLURM_* ones (LOCAL_RANK picks the GPU).
    launched = not dist.is_initialized() and apply_rank_env() is not None
    device = resolve_device(device_name)
    _start_process_group(device, timedelta(seconds=collective_timeout_s), launched)
    world_size = dist.get_world_size()
    if world_size != parallel.world_size:
        raise ConfigError(
            f"parallel.tp*pp*dp = {parallel.tp}*{parallel.pp}*{parallel.dp} = {parallel.world_size} "
            f"but the job has {world_size} processes"
        )
    if parallel_state.model_parallel_is_initialized():
        shutdown_topology()
    _GROUPS_BEFORE_TOPOLOGY.clear()
    _GROUPS_BEFORE_TOPOLOGY.update(id(pg) for pg in _process_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp
    )
    topo = Topology(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tp=parallel.tp,
        pp=parallel.pp,
        dp=parallel.dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )
    log.info("topology: %s", topo.describe())
    return topo


_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*")


def collective_failure(err: BaseException) -> str | None:
    """One line for an error that means a peer rank died or hung during a collective; None otherwise.

    gloo raises RuntimeError from its transport ("[.../pair.cc:537] Read error ...: Connection reset by
    peer"), NCCL and the store raise torch.distributed.DistError; the launcher names the rank that failed first.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(err)
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and ("gloo" in text or "NCCL" in text))):
        return None
    first = _SOURCE_LOCATION.sub("", text.strip().splitlines()[0] if text.strip() else type(err).__name__)
    return (f"rank {dist.get_rank()}/{dist.get_world_size()}: a collective failed: {first.split('. ')[0]}. "
            "Another rank has likely died or hung; the launcher's log names the one that failed first")


# The process groups that existed before `init_topology` made megatron-core's (by id), so that
# `shutdown_topology` destroys only what the topology and the engine on it created.
_GROUPS_BEFORE_TOPOLOGY: set[int] = set()


def _process_groups() -> list:
    return list(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else []


def shutdown_topology() -> None:
    """Tear down megatron-core's groups and every process group created since `init_topology` (megatron's,
    DeepSpeed's pipeline and ZeRO groups); the default group stays up for reuse in this process.

    Each gloo group keeps a thread polling its sockets: a process that runs one job after another (an
    in-process sweep, the test suite) would otherwise pile up tens of idle-but-polling threads per job."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    world = dist.GroupMember.WORLD if dist.is_initialized() else None
    for group in _process_groups():
        if group is not world and id(group) not in _GROUPS_BEFORE_TOPOLOGY:
            dist.destroy_process_group(group)
