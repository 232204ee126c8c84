"""Checkpoints: layout-independent, written atomically, the last K kept, loaded without running code.

Layout of one checkpoint, `<run_dir>/checkpoints/step_00000200/`:
    model-tp00-pp00.safetensors   full fp32 weights of one (tp, pp) shard, single-process parameter names
    optim-tp00-pp00.safetensors   its Adam moments (`exp_avg/<name>`, `exp_avg_sq/<name>`)
    shard-tp00-pp00.json          the dimension each parameter is split along over tp; the Adam step
    rng-rank00000.pt              the random generators of one rank
    data.json                     the data stream position (the same on every rank)
    tokenizer.json                the tokenizer the model was trained with, so the checkpoint decodes by itself
    manifest.json                 every other file's size and crc32, per tensor for the safetensors files
    trainer_state.json            step, tokens seen, the layout and the config that produced it
Weights and moments are gathered over ZeRO partitions and named as the single-process GPT names them,
so a checkpoint saved at one (tp, pp, dp, ZeRO) layout loads at any other. Everything is written into
`step_00000200.tmp/` and renamed when complete, so a crash mid-save leaves the previous checkpoints
untouched and no half-written one under a final name; a save that fails (a full disk) removes its `.tmp`.

A weights-only checkpoint (`weights_only: true` in its state: an imported model, `python -m trainer.convert
from-hf`) holds the model and shard files, the tokenizer and the manifest: `train.init_from` starts a run from
it, `train.resume` refuses it.

`train.resume=auto` takes the newest checkpoint that is intact (every file present, of its saved size,
every tensor and file matching its checksum) and says with a WARNING which newer ones it passed over and
why (trainer/checkpoint_manifest.py); a checkpoint written before manifests existed is checked for presence
only.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.checkpoint_manifest import entry_problem, file_entry, tensors_entry
from trainer.parallel.topology import Topology

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"


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
    # Weights only (an imported model): no optimizer, random-generator or data files.
    weights_only: bool = False
    # LoRA: the files hold the adapters only; this names their base model (trainer.lora.AdapterRecord).
    adapters: dict | None = None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temporary directories are ignored)."""
    return [(step, path) for step, path in reversed(_step_dirs(root)) if (path / STATE_FILE).is_file()]


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every `step_N` directory under `root`, complete or not, newest first (`.tmp` ones are not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), entry) for entry in root.iterdir() if (m := STEP_DIR.match(entry.name))]
    return sorted((step, path) for step, path in found if path.is_dir())[::-1]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """Map `train.resume` to a checkpoint directory, or None to start fresh."""
    if resume == "auto":
        return _newest_intact(root)
    if resume == "never":
        existing = list_checkpoints(root)
        if existing:
            raise CheckpointError(
                f"train.resume=never but {root} already holds checkpoints (latest: {existing[-1][1].name}); "
                "use train.resume=auto to continue, or another train.run_name for a new run"
            )
        return None
    return _named_checkpoint(resume)


def _newest_intact(root: Path) -> Path | None:
    """The newest intact checkpoint under `root` (WARNINGs name the newer ones passed over), None if none exist."""
    rejected: list[str] = []
    for _, path in _step_dirs(root):
        problem = checkpoint_problem(path)
        if problem is None:
            for reason in rejected:
                log.warning("train.resume=auto: passing over a damaged checkpoint: %s; resuming from %s",
                            reason, path)
            return path
        rejected.append(problem)
    if rejected:
        raise CheckpointError(
            f"train.resume=auto: no intact checkpoint in {root}: {'; '.join(rejected)}. Move them away to start "
            "afresh, or use another train.run_name"
        )
    return None


def _named_checkpoint(resume: str) -> Path:
    """`train.resume=<dir>`: exactly that checkpoint; if it is damaged, the error names the one before it."""
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume!r}: not a complete checkpoint directory (no such directory)")
    problem = checkpoint_problem(path)
    if problem is None:
        return path
    previous = _previous_intact(path)
    hint = (f"to resume from the previous intact checkpoint use train.resume={previous}" if previous
            else "no intact checkpoint precedes it")
    raise CheckpointError(f"train.resume={resume!r}: not a complete checkpoint directory: {problem}; {hint}")


def _previous_intact(path: Path) -> Path | None:
    """The newest intact checkpoint next to `path` with a lower step, if any."""
    match = STEP_DIR.match(path.name)
    step = int(match.group(1)) if match else float("inf")
    return next((p for s, p in _step_dirs(path.parent) if s < step and checkpoint_problem(p) is None), None)


def checkpoint_problem(path: Path) -> str | None:
    """What makes a checkpoint unusable, naming the file and the problem; None if it is intact.

    Every file the saving layout wrote must be present; with a manifest, every file must also have its
    saved size and checksums (per tensor for safetensors files). Without one (saved before manifests
    existed) presence is all that can be checked.
    """
    if not (path / STATE_FILE).is_file():
        return f"{path / STATE_FILE}: missing (deleted, or the save never finished)"
    try:
        state = load_trainer_state(path)
    except CheckpointError as err:
        return str(err)
    missing = [name for name in _expected_files(state) if not (path / name).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
        return f"{path / missing[0]}: missing{more}"
    if not (path / MANIFEST_FILE).is_file():
        log.info("%s has no %s (saved before checksums were recorded): its files are present, their contents "
                 "unchecked", path, MANIFEST_FILE)
        return None
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
        return next(filter(None, (entry_problem(path / name, entry) for name, entry in files.items())), None)
    except OSError as err:
        return f"{err.filename or path / MANIFEST_FILE}: unreadable ({err.strerror or err})"
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # the manifest itself is damaged
        return f"{path / MANIFEST_FILE}: unreadable manifest ({type(err).__name__}: {err})"


def _expected_files(state: TrainerState) -> list[str]:
    """The files a checkpoint holds besides its state, manifest and tokenizer."""
    tp, pp, dp = (state.layout[axis] for axis in ("tp", "pp", "dp"))
    kinds = ("model", "meta") if state.weights_only else ("model", "optim", "meta")
    shards = [_shard_files(t, p)[kind] for p in range(pp) for t in range(tp) for kind in kinds]
    if state.weights_only:
        return shards
    return [DATA_FILE, *shards, *(_rng_file(rank) for rank in range(tp * pp * dp))]


def _shard_files(tp_rank: int, pp_rank: int) -> dict[str, str]:
    tag = f"tp{tp_rank:02d}-pp{pp_rank:02d}"
    return {"model": f"model-{tag}.safetensors", "optim": f"optim-{tag}.safetensors", "meta": f"shard-{tag}.json"}


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


DATA_FILE = "data.json"
TOKENIZER_FILE = "tokenizer.json"


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
    root: Path, state: TrainerState, shard: ShardState, data_state: dict, topo: Topology, keep_last: int,
    tokenizer_json: str | None = None,
) -> Path:
    """Write one checkpoint from every rank, then publish it with a rename and prune old ones.

    `tokenizer_json` (the tokenizer.json text the model was trained with) is stored with it.

    A write that fails (a full disk) removes the `.tmp` directory and raises CheckpointError naming the file;
    the checkpoints published before are left as they were.
    """
    final = root / step_dir_name(state.step)
    staging = root / (final.name + ".tmp")
    _require_finite(shard, final, topo)  # before anything is written
    try:
        _write_staging(staging, state, shard, data_state, topo, tokenizer_json)
    except Exception as err:
        if topo.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, CheckpointError):
            raise CheckpointError(f"checkpoint {final.name} not saved: {err}; its .tmp directory was removed, the "
                                  "checkpoints saved before are as they were") from err
        raise
    if topo.is_main:
        _publish(staging, final)
        _prune(root, keep_last, state.step)
    _barrier()
    return final


def _write_staging(staging: Path, state: TrainerState, shard: ShardState, data_state: dict, topo: Topology,
                   tokenizer_json: str | None) -> None:
    """Every rank writes its files and their manifest entries into `staging`; rank 0 then the manifest and,
    last, the state file."""
    if topo.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    written: dict[str, dict] = {}
    if topo.dp_rank == 0:  # every dp replica holds the same full values
        files = _shard_files(topo.tp_rank, topo.pp_rank)
        written[files["model"]] = _save_tensors(shard.weights, staging / files["model"])
        written[files["optim"]] = _save_tensors(shard.moments, staging / files["optim"])
        written[files["meta"]] = _save_json(staging / files["meta"], {"partition_dims": shard.partition_dims,
                                                                      "adam_step": shard.adam_step})
    rng_file = staging / _rng_file(topo.rank)
    written[rng_file.name] = _save_file(rng_file, lambda file: torch.save(_rng_state(), file))
    if topo.is_main:
        written[DATA_FILE] = _save_json(staging / DATA_FILE, data_state)
        if tokenizer_json is not None:
            written[TOKENIZER_FILE] = _save_text(staging / TOKENIZER_FILE, tokenizer_json)
    # Merged into manifest.json and removed in a moment: not worth an fsync.
    _save_file(staging / _manifest_part(topo.rank), lambda file: file.write_text(json.dumps(written)))
    _barrier()
    if topo.is_main:
        _save_json(staging / MANIFEST_FILE, {"files": _merge_manifest_parts(staging, topo.world_size)})
        # The state file goes last: its presence marks a checkpoint as complete.
        _save_json(staging / STATE_FILE, state.__dict__)


def _manifest_part(rank: int) -> str:
    return f"manifest-rank{rank:05d}.json"


def _merge_manifest_parts(staging: Path, world_size: int) -> dict[str, dict]:
    """The manifest entries every rank wrote for its files, in one dict; the parts are removed."""
    merged: dict[str, dict] = {}
    for rank in range(world_size):
        part = staging / _manifest_part(rank)
        merged.update(json.loads(part.read_text()))
        part.unlink()
    return merged


def _save_file(file: Path, write: Callable[[Path], None]) -> dict:
    """Write one file with `write` and return its manifest entry (size, crc32); failures name the file."""
    try:
        write(file)
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save reports a full disk as RuntimeError
        raise CheckpointError(f"{file}: cannot be written ({_first_line(err)})") from err
    return file_entry(file)


def _save_json(file: Path, payload: Any) -> dict:
    return _save_file(file, lambda f: _write_json_atomic(f, payload))


def _save_text(file: Path, text: str) -> dict:
    def write(f: Path) -> None:
        with open(f, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return _save_file(file, write)


def write_weights_checkpoint(path: Path, state: TrainerState, weights: dict[str, torch.Tensor],
                             partition_dims: dict[str, int | None], tokenizer_json: str | None) -> Path:
    """Write a weights-only checkpoint of the single-process model at `path`, atomically (one process, tp=pp=1).

    Refuses to replace an existing directory. The files are those a tp=1, pp=1 run saves, less the optimizer,
    random-generator and data files; `state.weights_only` must be set.
    """
    if not state.weights_only or state.layout != {"tp": 1, "pp": 1, "dp": 1}:
        raise ValueError("a weights-only checkpoint has weights_only=True and the layout tp=pp=dp=1")
    if path.exists():
        raise CheckpointError(f"{path}: already exists; choose another output directory")
    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        files = _shard_files(0, 0)
        written = {files["model"]: _save_tensors(weights, staging / files["model"]),
                   files["meta"]: _save_json(staging / files["meta"], {"partition_dims": partition_dims,
                                                                       "adam_step": 0})}
        if tokenizer_json is not None:
            written[TOKENIZER_FILE] = _save_text(staging / TOKENIZER_FILE, tokenizer_json)
        _save_json(staging / MANIFEST_FILE, {"files": written})
        _save_json(staging / STATE_FILE, state.__dict__)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _save_tensors(tensors: dict[str, torch.Tensor], file: Path) -> dict:
    """Write a safetensors file; its manifest entry holds each tensor's crc32 (computed in memory, not re-read)."""
    _save_file(file, lambda f: save_file(tensors, str(f)))
    return tensors_entry(file, tensors)


def _publish(staging: Path, final: Path) -> None:
    if final.exists():  # re-saving the same step (e.g. the final save of a resumed, finished run)
        retired = final.with_name(final.name + ".old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired)
    else:
        os.replace(staging, final)


def _prune(root: Path, keep_last: int, newest: int) -> None:
    """Keep the last `keep_last` checkpoints up to step `newest`.

    Newer ones (a damaged checkpoint that resume=auto passed over, or one past an explicit train.resume) are
    neither counted nor removed: counting them could prune every intact checkpoint. Saving their step again
    replaces them."""
    if keep_last <= 0:
        return
    for _, path in [c for c in list_checkpoints(root) if c[0] <= newest][:-keep_last]:
        shutil.rmtree(path)


# The type of each field of trainer_state.json (vocab_size and weights_only are absent from early checkpoints).
_STATE_TYPES = {"step": int, "tokens_seen": int, "layout": dict, "config": dict, "vocab_size": int,
                "weights_only": bool, "adapters": dict}
_OPTIONAL_STATE_FIELDS = ("vocab_size", "weights_only", "adapters")
_NULLABLE_STATE_FIELDS = ("adapters",)


def load_trainer_state(path: Path) -> TrainerState:
    """The step, tokens, layout and config recorded in a checkpoint; anything else is a CheckpointError."""
    file = path / STATE_FILE
    try:
        with open(file) as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{file}: unreadable checkpoint state ({err})") from None
    problem = _state_problem(raw)
    if problem:
        raise CheckpointError(f"{file}: not a trainer state: {problem}")
    return TrainerState(**raw)


def _state_problem(raw: Any) -> str | None:
    """What is wrong with the fields of a parsed trainer_state.json, or None."""
    if not isinstance(raw, dict):
        return f"a JSON {type(raw).__name__}, not an object"
    if unknown := sorted(set(raw) - set(_STATE_TYPES)):
        return f"unknown field {unknown[0]!r}"
    for key, kind in _STATE_TYPES.items():
        if key not in raw and key not in _OPTIONAL_STATE_FIELDS:
            return f"no {key!r}"
        if key in _NULLABLE_STATE_FIELDS and raw.get(key) is None:
            continue
        if key in raw and (not isinstance(raw[key], kind) or (isinstance(raw[key], bool) and kind is not bool)):
            return f"{key!r} is {raw[key]!r}, not {'an' if kind is int else 'a'} {kind.__name__}"
    sizes = [raw["layout"].get(axis) for axis in ("tp", "pp", "dp")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
        return f"'layout' is {raw['layout']!r}, not tp, pp and dp sizes >= 1"
    if raw["step"] < 0 or raw["tokens_seen"] < 0:
        return f"negative 'step' or 'tokens_seen' ({raw['step']}, {raw['tokens_seen']})"
    return None


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

    def tokenizer_json(self) -> str | None:
        """The tokenizer.json text saved with the model; None for a checkpoint saved without one."""
        file = self.path / TOKENIZER_FILE
        return _read(file, lambda f: f.read_text(encoding="utf-8")) if file.is_file() else None

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
        raise CheckpointError(f"{file}: unreadable or unsafe checkpoint file ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    """The first line of an error's message (its type if it has none), without PyTorch's advice to load an
    unsafe file with `weights_only=False`: that would run the code we just refused."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if "Weights only load failed" in str(err):
        unpickler = next((line for line in lines if line.startswith("WeightsUnpickler error:")), "")
        detail = unpickler.removeprefix("WeightsUnpickler error:").split(". ")[0].strip()  # not its advice
        return f"refused: it holds Python objects other than tensors and plain values ({detail})"
    return lines[0] if lines else type(err).__name__
