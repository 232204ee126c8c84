"""Checkpoints are atomic, pruned, located by train.resume, resharded on load, checked before a resume, and
never run code."""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import subprocess
import zlib

import pytest
import torch
from safetensors.torch import save_file

from trainer.checkpoint import (
    CheckpointError,
    CheckpointReader,
    ShardState,
    TrainerState,
    checkpoint_problem,
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


def test_a_failed_save_removes_its_tmp_and_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("trainer.checkpoint._write_json_atomic", disk_full)
    with pytest.raises(CheckpointError, match=r"step_00000002 not saved: .*shard-tp00-pp00.json: cannot be "
                                              r"written \(No space left on device\)"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no step_00000002.tmp left
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000001"


def _mount_tmpfs(path, size: str) -> None:
    """A small tmpfs at `path` (root only), or skip the test saying why."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which only root can mount")
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")


def test_a_full_disk_during_save_removes_the_tmp_and_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "small-disk"
    _mount_tmpfs(root, "256k")
    try:
        first = _save(root, 1)
        big = ShardState({"w": torch.zeros(128, 1024)}, {}, {"w": None}, 1)  # 512 KiB: does not fit
        with pytest.raises(CheckpointError, match=r"step_00000002 not saved: .*model-tp00-pp00.safetensors: "
                                                  r"cannot be written \(.*No space left on device"):
            _save(root, 2, shard=big)
        assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
        assert checkpoint_problem(first) is None
    finally:
        subprocess.run(["umount", str(root)], check=True)


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
    with pytest.raises(CheckpointError, match="rng-rank00000.pt: unreadable or unsafe") as refused:
        CheckpointReader(path).restore_rng(TOPO)
    # Named for what it is; PyTorch's advice to load it anyway (weights_only=False, or allowlisting what it
    # calls) is not repeated: either would run its code.
    message = str(refused.value)
    assert message.endswith("(refused: it holds Python objects other than tensors and plain values "
                            "(Unsupported global: GLOBAL print was not an allowed global by default))")
    assert "weights_only" not in message and "can still be loaded" not in message and "allowlist" not in message


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


def _overwrite_tensor(file, name: str, values: torch.Tensor) -> None:
    """Overwrite the bytes of tensor `name` inside a safetensors file in place: same size, other values."""
    raw = bytearray(file.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    begin, end = json.loads(raw[8:8 + header_len])[name]["data_offsets"]
    raw[8 + header_len + begin:8 + header_len + end] = values.contiguous().view(torch.uint8).numpy().tobytes()
    file.write_bytes(bytes(raw))


def test_every_tensor_and_file_is_checksummed_at_save(tmp_path):
    path = _save(tmp_path, 1)
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(files) == ["data.json", "model-tp00-pp00.safetensors", "optim-tp00-pp00.safetensors",
                             "rng-rank00000.pt", "shard-tp00-pp00.json"]
    weight = files["model-tp00-pp00.safetensors"]["tensors"]["lin.weight"]
    assert weight == {"shape": [4, 3], "nbytes": 48,
                      "crc32": zlib.crc32(torch.full((4, 3), 0.5).view(torch.uint8).numpy())}
    assert files["data.json"]["crc32"] == zlib.crc32((path / "data.json").read_bytes())
    assert checkpoint_problem(path) is None


def test_resume_auto_passes_over_a_truncated_newest_checkpoint_with_a_warning(tmp_path, caplog):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    weights = newest / "model-tp00-pp00.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000001"
    size = weights.stat().st_size
    assert f"{weights}: {size} bytes, {size + 10} when saved (truncated); resuming from " \
           f"{tmp_path / 'step_00000001'}" in caplog.text


def test_nan_bytes_in_a_weight_file_fail_its_checksum_naming_file_and_tensor(tmp_path, caplog):
    previous = _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    weights = newest / "model-tp00-pp00.safetensors"
    _overwrite_tensor(weights, "lin.weight", torch.full((4, 3), float("nan")))
    problem = f"{weights}: checksum mismatch in tensor 'lin.weight'"
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert resolve_resume("auto", tmp_path) == previous
    assert problem in caplog.text
    # Named explicitly, that checkpoint and no other; the error says how to take the one before it.
    with pytest.raises(CheckpointError) as refused:
        resolve_resume(str(newest), tmp_path)
    assert problem in str(refused.value)
    assert str(refused.value).endswith(f"to resume from the previous intact checkpoint use train.resume={previous}")


def test_a_deleted_state_file_falls_back_to_the_previous_checkpoint_with_a_warning(tmp_path, caplog):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000001"
    assert f"passing over a damaged checkpoint: {newest / 'trainer_state.json'}: missing" in caplog.text


def test_a_checkpoint_saved_before_manifests_existed_is_checked_for_presence_only(tmp_path, caplog):
    path = _save(tmp_path, 1)
    (path / "manifest.json").unlink()
    with caplog.at_level(logging.INFO, logger="trainer.checkpoint"):
        assert resolve_resume("auto", tmp_path) == path
    assert "has no manifest.json (saved before checksums were recorded)" in caplog.text
    (path / "rng-rank00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*rng-rank00000.pt: missing"):
        resolve_resume("auto", tmp_path)


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("step", "12", "'step' is '12', not an int"),
    ("layout", {"tp": 1, "pp": 0, "dp": 1}, "'layout' is {'tp': 1, 'pp': 0, 'dp': 1}, not tp, pp and dp sizes"),
    ("config", [], "'config' is [], not a dict"),
])
def test_a_state_file_with_wrong_types_is_named(tmp_path, field, value, problem):
    path = _save(tmp_path, 1)
    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**state, field: value}))
    with pytest.raises(CheckpointError) as refused:
        resolve_resume("auto", tmp_path)
    assert f"{path / 'trainer_state.json'}: not a trainer state: {problem}" in str(refused.value)


def test_pruning_never_counts_checkpoints_newer_than_the_one_saved(tmp_path):
    # A damaged step 4 that resume=auto passed over must not push the intact checkpoints out.
    damaged = _save(tmp_path, 4)
    (damaged / "optim-tp00-pp00.safetensors").write_bytes(b"")
    _save(tmp_path, 2, keep_last=1)
    _save(tmp_path, 3, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000003"


@pytest.mark.parametrize(("final_checkpoint", "preempted_by", "saved"),
                         [(True, None, True), (False, None, False), (False, "SIGUSR1", True)])
def test_the_final_checkpoint_is_optional_but_a_preempted_run_always_writes_one(final_checkpoint, preempted_by,
                                                                                saved):
    from types import SimpleNamespace

    from trainer.run import _final_checkpoint

    calls = []
    config = SimpleNamespace(train=SimpleNamespace(final_checkpoint=final_checkpoint))
    result = SimpleNamespace(preempted_by=preempted_by)
    path = _final_checkpoint(config, "progress", result, lambda progress: calls.append(progress) or "ckpt")
    assert (calls == ["progress"], path) == (saved, "ckpt" if saved else None)
