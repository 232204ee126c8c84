"""Checkpoints: written atomically, the last K kept, loaded without ever unpickling code.

Layout of one checkpoint, `<run_dir>/checkpoints/step_00000200/`:
    model-tp00-pp00.safetensors   weights of one (tp, pp) shard, written by its dp-rank-0 process
    optim-rank00000.pt            optimizer + LR scheduler state of one rank (tensors and plain values)
    rng-rank00000.pt              the random generators of one rank
    data-dp00000.json             the data stream position of one data-parallel replica
    trainer_state.json            step, tokens seen, the layout and the config that produced it
Everything is written into `step_00000200.tmp/` and renamed when complete, so a crash mid-save
leaves the previous checkpoints untouched and no half-written one under a final name.
"""

from __future__ import annotations

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
import torch.nn as nn
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


def _rank_files(topo: Topology) -> dict[str, str]:
    return {
        "model": f"model-tp{topo.tp_rank:02d}-pp{topo.pp_rank:02d}.safetensors",
        "optim": f"optim-rank{topo.rank:05d}.pt",
        "rng": f"rng-rank{topo.rank:05d}.pt",
        "data": f"data-dp{topo.dp_rank:05d}.json",
    }


def tensor_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors, contiguous and on the CPU (megatron's empty `_extra_state` entries dropped)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if torch.is_tensor(v)}


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
    root: Path,
    state: TrainerState,
    model: nn.Module,
    optimizer_state: dict,
    data_state: dict,
    topo: Topology,
    keep_last: int,
) -> Path:
    """Write one checkpoint for every rank, then publish it with a rename and prune old ones."""
    final = root / step_dir_name(state.step)
    staging = root / (final.name + ".tmp")
    if topo.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    files = _rank_files(topo)
    if topo.dp_rank == 0:
        save_file(tensor_state_dict(model), str(staging / files["model"]))
    torch.save(optimizer_state, staging / files["optim"])
    torch.save(_rng_state(), staging / files["rng"])
    if topo.tp_rank == 0 and topo.pp_rank == 0:
        _write_json_atomic(staging / files["data"], data_state)
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


def load_checkpoint(path: Path, model: nn.Module, topo: Topology) -> tuple[dict, dict]:
    """Load this rank's weights and RNG into place; return (optimizer_state, data_state)."""
    files = _rank_files(topo)
    for name in files.values():
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name} for {topo.describe()} (saved with another layout?)")
    weights = _read(path / files["model"], lambda f: load_file(str(f)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path / files['model']}: missing keys {missing}, unexpected keys {unexpected}")
    optimizer_state = _read(path / files["optim"], _load_tensors)
    _set_rng_state(_read(path / files["rng"], _load_tensors))
    data_state = _read(path / files["data"], lambda f: json.loads(f.read_text()))
    return optimizer_state, data_state


def _load_tensors(file: Path) -> Any:
    # weights_only: a checkpoint holds tensors and plain values, never code to run.
    return torch.load(file, map_location="cpu", weights_only=True)


def _read(file: Path, reader: Callable[[Path], Any]) -> Any:
    """Read one checkpoint file; a corrupt or unsafe file becomes a CheckpointError naming it."""
    try:
        return reader(file)
    except Exception as err:  # noqa: BLE001 - any decoder failure means the same thing to the user
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{file}: unreadable or unsafe checkpoint file ({first_line})") from err
