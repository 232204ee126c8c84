"""Checkpoints: layout-independent, written atomically, the last K kept, loaded without running code.

Layout of one checkpoint, `<run_dir>/checkpoints/step_00000200/`:
    model-tp00-pp00.safetensors   full fp32 weights of one (tp, pp) shard, single-process parameter names
    optim-tp00-pp00.safetensors   its Adam moments (`exp_avg/<name>`, `exp_avg_sq/<name>`)
    shard-tp00-pp00.json          the dimension each parameter is split along over tp; the Adam step
    rng-rank00000.pt              the random generators of one rank
    data.json                     the data stream position (the same on every rank)
    trainer_state.json            step, tokens seen, the layout and the config that produced it
Weights and moments are gathered over ZeRO partitions and named as the single-process GPT names them,
so a checkpoint saved at one (tp, pp, dp, ZeRO) layout loads at any other. Everything is written into
`step_00000200.tmp/` and renamed when complete, so a crash mid-save leaves the previous checkpoints
untouched and no half-written one under a final name.
"""

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from trainer.parallel.topology import Topology

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the configured run."""


@dataclass
class TrainerState:
    """Where training stands, besides weights and optimizer: step, tokens, layout, config."""

    step: int
    tokens_seen: int
    layout: dict
    config: dict
    # The tokenizer's vocabulary (the embedding has padding rows beyond it).
    vocab_size: int = 0


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def resolve_resume(resume: str, root: Path) -> Path | None:
    """Map `train.resume` to a checkpoint directory, or None to start fresh."""
    existing = list_checkpoints(root)
    if resume == "auto":
        return existing[-1][1] if existing else None
    if resume == "never":
        if existing:
            raise CheckpointError(
                f"train.resume=never but {root} already holds checkpoints (latest: {existing[-1][1].name}); "
                "use train.resume=auto to continue, or another train.run_name for a new run"
            )
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"train.resume={resume!r}: not a complete checkpoint directory (no {STATE_FILE})")
    return path


def _shard_files(tp_rank: int, pp_rank: int) -> dict[str, str]:
    tag = f"tp{tp_rank:02d}-pp{pp_rank:02d}"
    return {"model": f"model-{tag}.safetensors", "optim": f"optim-{tag}.safetensors", "meta": f"shard-{tag}.json"}


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


DATA_FILE = "data.json"


@dataclass
class ShardState:
    """One (tp, pp) shard's full-over-dp tensors, as `trainer.sharded_state.gather_full_state` returns them."""

    weights: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]
    partition_dims: dict[str, int | None]
    adam_step: int


def _require_finite(shard: ShardState, final: Path, topo: Topology) -> None:
    """Refuse to write a checkpoint holding NaN or infinite weights or moments. Collective: all ranks raise."""
    culprit = _non_finite_tensor(shard) if topo.dp_rank == 0 else None  # dp replicas hold the same values
    flag = torch.tensor([float(culprit is not None)], device=topo.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    if flag.item():
        raise CheckpointError(f"checkpoint {final} not written: {culprit or 'another rank holds non-finite values'}; "
                              "training has diverged (lower optim.lr?); the checkpoints saved before are as they were")


def _non_finite_tensor(shard: ShardState) -> str | None:
    """'weight NAME has N NaN or infinite values (of M)' for the first such tensor, or None."""
    for kind, tensors in (("weight", shard.weights), ("Adam moment", shard.moments)):
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                return f"{kind} {name} has {bad:,} NaN or infinite values (of {tensor.numel():,})"
    return None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(
    root: Path, state: TrainerState, shard: ShardState, data_state: dict, topo: Topology, keep_last: int
) -> Path:
    """Write one checkpoint from every rank, then publish it with a rename and prune old ones."""
    final = root / step_dir_name(state.step)
    staging = root / (final.name + ".tmp")
    _require_finite(shard, final, topo)  # before anything is written
    if topo.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    if topo.dp_rank == 0:  # every dp replica holds the same full values
        files = _shard_files(topo.tp_rank, topo.pp_rank)
        save_file(shard.weights, str(staging / files["model"]))
        save_file(shard.moments, str(staging / files["optim"]))
        _write_json_atomic(staging / files["meta"], {"partition_dims": shard.partition_dims,
                                                     "adam_step": shard.adam_step})
    torch.save(_rng_state(), staging / _rng_file(topo.rank))
    if topo.is_main:
        _write_json_atomic(staging / DATA_FILE, data_state)
    _barrier()
    if topo.is_main:
        # The state file goes last: its presence marks a checkpoint as complete.
        _write_json_atomic(staging / STATE_FILE, state.__dict__)
        _publish(staging, final)
        _prune(root, keep_last)
    _barrier()
    return final


def _publish(staging: Path, final: Path) -> None:
    if final.exists():  # re-saving the same step (e.g. the final save of a resumed, finished run)
        retired = final.with_name(final.name + ".old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired)
    else:
        os.replace(staging, final)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path)


def load_trainer_state(path: Path) -> TrainerState:
    """The step, tokens, layout and config recorded in a checkpoint."""
    try:
        with open(path / STATE_FILE) as handle:
            return TrainerState(**json.load(handle))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable checkpoint state ({err})") from None


class CheckpointReader:
    """Full tensors by single-process name, assembled from the saved (tp, pp) shards of any layout."""

    def __init__(self, path: Path):
        self.path = path
        self.state = load_trainer_state(path)
        self.saved_tp = int(self.state.layout["tp"])
        saved_pp = int(self.state.layout["pp"])
        self._owner: dict[str, int] = {}  # name -> the pp rank whose files hold it
        self._dims: dict[str, int | None] = {}
        self.adam_step = 0
        for pp_rank in range(saved_pp):
            meta = _read(path / _shard_files(0, pp_rank)["meta"], lambda f: json.loads(f.read_text()))
            self.adam_step = int(meta["adam_step"])
            for name, dim in meta["partition_dims"].items():
                self._owner.setdefault(name, pp_rank)
                self._dims[name] = dim
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}

    def _file(self, kind: str, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
        name = _shard_files(tp_rank, pp_rank)[kind]
        if name not in self._tensors:
            self._tensors[name] = _read(self.path / name, lambda f: load_file(str(f)))
        return self._tensors[name]

    def read(self, key: str) -> torch.Tensor:
        """`<name>` for a weight, `exp_avg/<name>` or `exp_avg_sq/<name>` for a moment: the full tensor."""
        kind, name = ("optim", key.split("/", 1)[1]) if "/" in key else ("model", key)
        if name not in self._owner:
            raise CheckpointError(f"{self.path}: no parameter {name!r} (saved from another model?)")
        pp_rank, dim = self._owner[name], self._dims[name]
        shards = [self._file(kind, tp_rank, pp_rank)[key] for tp_rank in range(self.saved_tp)]
        return shards[0] if dim is None else torch.cat(shards, dim=dim)

    def parameter_names(self) -> list[str]:
        """Every parameter the checkpoint holds, by single-process name."""
        return list(self._owner)

    def data_state(self) -> dict:
        return _read(self.path / DATA_FILE, lambda f: json.loads(f.read_text()))

    def restore_rng(self, topo: Topology) -> bool:
        """Put this rank's generators back if the layout is unchanged; False if they cannot be matched."""
        if self.state.layout != topo.layout:
            return False
        _set_rng_state(_read(self.path / _rng_file(topo.rank), _load_tensors))
        return True


def _load_tensors(file: Path) -> Any:
    # weights_only: a checkpoint holds tensors and plain values, never code to run.
    return torch.load(file, map_location="cpu", weights_only=True)


def _read(file: Path, reader: Callable[[Path], Any]) -> Any:
    """Read one checkpoint file; a missing, corrupt or unsafe file becomes a CheckpointError naming it."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing from the checkpoint")
    try:
        return reader(file)
    except Exception as err:  # noqa: BLE001 - any decoder failure means the same thing to the user
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{file}: unreadable or unsafe checkpoint file ({first_line})") from err
