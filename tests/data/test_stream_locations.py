"""The training stream reads shards from other locations, and survives corrupt shards."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from data_pipeline.shards import CorruptShardError
from data_pipeline.stream import TokenStream, eval_batches


def _take(stream: TokenStream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def test_a_pipe_location_streams_the_same_batches(tiny_prepared):
    cfg, _ = tiny_prepared
    local = TokenStream(cfg.prepared_dir, "train", 16, 3, seed=5)
    piped = TokenStream(f"pipe:cat {cfg.prepared_dir}/{{shard}}", "train", 16, 3, seed=5)
    for (x1, y1), (x2, y2) in zip(_take(local, 12), _take(piped, 12), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def _with_a_truncated_train_shard(tiny_prepared, tmp_path) -> tuple[str, str]:
    """A copy of the prepared corpus whose second training shard was cut mid-transfer: (dir, shard file)."""
    cfg, index = tiny_prepared
    copy = tmp_path / "prepared"
    shutil.copytree(cfg.prepared_dir, copy)
    victim = index["splits"]["train"]["shards"][1]["file"]
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[: len(data) // 2])
    return str(copy), victim


def test_a_corrupt_training_shard_is_skipped_counted_and_named(tiny_prepared, tmp_path, caplog):
    copy, victim = _with_a_truncated_train_shard(tiny_prepared, tmp_path)
    stream = TokenStream(str(copy), "train", 16, 3, seed=5, shuffle_block_shards=2)
    n_windows = stream._layout_of(0).n_windows
    with caplog.at_level(logging.WARNING):
        batches = _take(stream, n_windows // 3 + 2)  # a whole epoch and a little more
    assert all(x.shape == (3, 16) and y.shape == (3, 16) for x, y in batches)
    assert stream.skips.count >= 1
    assert any(victim in record.getMessage() and "skipping corrupt shard" in record.getMessage()
               for record in caplog.records)
    # The position stays the one index.json implies: it resumes like an intact stream.
    resumed = TokenStream(str(copy), "train", 16, 3, seed=5, shuffle_block_shards=2)
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    expected = next(stream)
    actual = next(resumed)
    assert torch.equal(expected[0], actual[0])


def test_a_corrupt_validation_shard_fails_loudly(tiny_prepared, tmp_path):
    cfg, index = tiny_prepared
    copy = tmp_path / "prepared"
    shutil.copytree(cfg.prepared_dir, copy)
    victim = index["splits"]["val"]["shards"][0]["file"]
    (copy / victim).write_bytes(b"\0garbage" * 100)
    with pytest.raises(CorruptShardError, match=victim):
        eval_batches(str(copy), 8, 2, 4)


@pytest.mark.parametrize("split_mode", ["global", "shards"])
def test_shards_skipped_by_dataloader_workers_are_counted_here(tiny_prepared, tmp_path, split_mode):
    from data_pipeline.stream import StreamLoader, skipped_shards

    copy, _ = _with_a_truncated_train_shard(tiny_prepared, tmp_path)
    stream = TokenStream(str(copy), "train", 16, 3, seed=5, shuffle_block_shards=2, num_workers=2,
                         split_mode=split_mode)
    loader = StreamLoader(stream)
    n_windows = TokenStream(str(copy), "train", 16, 3, seed=5, shuffle_block_shards=2)._layout_of(0).n_windows
    for _ in range(n_windows // 3 + 2):  # a whole epoch and a little more: every shard is read
        next(loader)
    first = skipped_shards(loader)
    assert first >= 1  # each worker that met the corrupt shard counted it, in its shared slot
    loader.close()  # stopped workers' counts are kept
    assert skipped_shards(loader) == first
    next(loader)
    assert skipped_shards(loader) >= first
