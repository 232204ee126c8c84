"""Checkpoints are atomic, pruned, located by train.resume, and never a way to run code."""

from __future__ import annotations

import pickle

import pytest
import torch

from trainer.checkpoint import (
    CheckpointError,
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from trainer.parallel.topology import Topology

TOPO = Topology(rank=0, world_size=1, local_rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                device=torch.device("cpu"))


def _save(root, step, model, keep_last=3):
    state = TrainerState(step=step, tokens_seen=step * 10, layout={"tp": 1, "pp": 1, "dp": 1}, config={})
    optim = {"optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "scheduler": {}}
    return save_checkpoint(root, state, model, optim, {"epoch": 0, "cursor": step}, TOPO, keep_last)


def test_save_then_load_restores_weights_rng_and_data_position(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.manual_seed(5)
    path = _save(tmp_path, 7, model)
    expected_draw = torch.rand(3)
    restored = torch.nn.Linear(3, 2)
    optim, data = load_checkpoint(path, restored, TOPO)
    assert torch.equal(restored.weight, model.weight) and torch.equal(restored.bias, model.bias)
    assert torch.equal(torch.rand(3), expected_draw)  # the generator is back where it was at save time
    assert data == {"epoch": 0, "cursor": 7}
    assert optim["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_keeps_only_the_last_k_and_ignores_unfinished(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, keep_last=2)
    (tmp_path / "step_00000009.tmp").mkdir()  # a save that died half-way
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000004"


def test_a_crash_during_save_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    _save(tmp_path, 1, model)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("trainer.checkpoint._write_json_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 2, model)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not (tmp_path / "step_00000002").exists()
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000001"


def test_resaving_the_same_step_replaces_it(tmp_path):
    model = torch.nn.Linear(2, 2)
    _save(tmp_path, 3, model)
    with torch.no_grad():
        model.weight.fill_(1.5)
    path = _save(tmp_path, 3, model)
    restored = torch.nn.Linear(2, 2)
    load_checkpoint(path, restored, TOPO)
    assert torch.all(restored.weight == 1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_that_carries_code_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = _save(tmp_path, 1, model)
    with open(path / "optim-rank00000.pt", "wb") as handle:
        pickle.dump({"optimizer": _Payload()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="optim-rank00000.pt: unreadable or unsafe"):
        load_checkpoint(path, torch.nn.Linear(2, 2), TOPO)


def test_a_truncated_weights_file_is_named(tmp_path):
    path = _save(tmp_path, 1, torch.nn.Linear(2, 2))
    weights = path / "model-tp00-pp00.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="model-tp00-pp00.safetensors: unreadable"):
        load_checkpoint(path, torch.nn.Linear(2, 2), TOPO)


def test_resume_path_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    assert resolve_resume("auto", tmp_path / "empty") is None


def test_loading_with_a_missing_shard_names_the_file(tmp_path):
    path = _save(tmp_path, 1, torch.nn.Linear(2, 2))
    (path / "model-tp00-pp00.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-tp00-pp00.safetensors"):
        load_checkpoint(path, torch.nn.Linear(2, 2), TOPO)
