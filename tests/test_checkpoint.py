"""Checkpoints are atomic, pruned, located by train.resume, resharded on load, and never run code."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from trainer.checkpoint import (
    CheckpointError,
    CheckpointReader,
    ShardState,
    TrainerState,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from trainer.parallel.topology import Topology
from trainer.sharded_state import local_slice

TOPO = Topology(rank=0, world_size=1, local_rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                device=torch.device("cpu"))


def _shard(fill: float = 0.5) -> ShardState:
    weight = torch.full((4, 3), fill)
    return ShardState(
        weights={"lin.weight": weight, "lin.bias": torch.arange(4.0)},
        moments={"exp_avg/lin.weight": weight * 2, "exp_avg_sq/lin.weight": weight * 3,
                 "exp_avg/lin.bias": torch.zeros(4), "exp_avg_sq/lin.bias": torch.ones(4)},
        partition_dims={"lin.weight": 0, "lin.bias": None},
        adam_step=7,
    )


def _save(root, step, shard=None, keep_last=3):
    state = TrainerState(step=step, tokens_seen=step * 10, layout={"tp": 1, "pp": 1, "dp": 1}, config={})
    return save_checkpoint(root, state, shard or _shard(), {"epoch": 0, "window": step}, TOPO, keep_last)


def test_save_then_read_restores_tensors_rng_and_data_position(tmp_path):
    torch.manual_seed(5)
    path = _save(tmp_path, 7)
    expected_draw = torch.rand(3)
    reader = CheckpointReader(path)
    assert torch.equal(reader.read("lin.weight"), torch.full((4, 3), 0.5))
    assert torch.equal(reader.read("exp_avg_sq/lin.weight"), torch.full((4, 3), 1.5))
    assert reader.adam_step == 7 and reader.state.step == 7
    assert reader.data_state() == {"epoch": 0, "window": 7}
    assert reader.restore_rng(TOPO)
    assert torch.equal(torch.rand(3), expected_draw)  # the generator is back where it was at save time


def test_tp_shards_are_concatenated_and_resliced(tmp_path):
    # Two tp shards saved by hand, read back whole, then sliced for tp=4.
    for tp_rank in range(2):
        shard = ShardState({"w": torch.full((2, 3), float(tp_rank))}, {}, {"w": 0}, 1)
        save_file(shard.weights, str(tmp_path / f"model-tp0{tp_rank}-pp00.safetensors"))
        (tmp_path / f"shard-tp0{tp_rank}-pp00.json").write_text('{"partition_dims": {"w": 0}, "adam_step": 1}')
    (tmp_path / "trainer_state.json").write_text(
        '{"step": 1, "tokens_seen": 1, "layout": {"tp": 2, "pp": 1, "dp": 1}, "config": {}}'
    )
    full = CheckpointReader(tmp_path).read("w")
    assert full.shape == (4, 3) and full[:2].eq(0).all() and full[2:].eq(1).all()
    quarter = local_slice(full, 0, tp_rank=3, tp=4, local_shape=torch.Size([1, 3]))
    assert quarter.eq(1).all() and quarter.shape == (1, 3)
    # A padded vocabulary that grows with tp gets zero rows; one that shrinks is trimmed.
    grown = local_slice(full, 0, tp_rank=1, tp=2, local_shape=torch.Size([3, 3]))
    assert grown.shape == (3, 3) and grown[:1].eq(1).all() and grown[1:].eq(0).all()


def test_keeps_only_the_last_k_and_ignores_unfinished(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    (tmp_path / "step_00000009.tmp").mkdir()  # a save that died half-way
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000004"


def test_a_crash_during_save_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("trainer.checkpoint._write_json_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not (tmp_path / "step_00000002").exists()
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000001"


def test_resaving_the_same_step_replaces_it(tmp_path):
    _save(tmp_path, 3)
    path = _save(tmp_path, 3, shard=_shard(fill=1.5))
    assert torch.all(CheckpointReader(path).read("lin.weight") == 1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_that_carries_code_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    with open(path / "rng-rank00000.pt", "wb") as handle:
        pickle.dump({"torch": _Payload()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="rng-rank00000.pt: unreadable or unsafe"):
        CheckpointReader(path).restore_rng(TOPO)


def test_a_truncated_weights_file_is_named(tmp_path):
    path = _save(tmp_path, 1)
    weights = path / "model-tp00-pp00.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="model-tp00-pp00.safetensors: unreadable"):
        CheckpointReader(path).read("lin.weight")


def test_resume_path_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    assert resolve_resume("auto", tmp_path / "empty") is None
    path = _save(tmp_path, 1)
    (path / "shard-tp00-pp00.json").unlink()
    with pytest.raises(CheckpointError, match="shard-tp00-pp00.json: missing"):
        CheckpointReader(path)
    with pytest.raises(CheckpointError, match="no parameter 'nope'"):
        _save(tmp_path, 2)
        CheckpointReader(tmp_path / "step_00000002").read("nope")
