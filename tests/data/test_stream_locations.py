"""The training stream reads shards from other locations, and survives corrupt shards.

A corrupt shard is skipped and counted exactly (once an epoch, once per reader that meets it), and the batches
around it, inputs and targets, are the ones index.json plans.
"""

from __future__ import annotations

import json
import logging
import random
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.shards import CorruptShardError
from data_pipeline.stream import TokenStream, eval_batches

# The training stream of the corrupt-shard tests: blocks of two shards, so a lost shard halves its block.
SEED, SEQ_LEN, BATCH, BLOCK_SHARDS = 5, 16, 3, 2


def _take(stream: TokenStream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def test_a_pipe_location_streams_the_same_batches(tiny_prepared):
    cfg, _ = tiny_prepared
    local = TokenStream(cfg.prepared_dir, "train", 16, 3, seed=5)
    piped = TokenStream(f"pipe:cat {cfg.prepared_dir}/{{shard}}", "train", 16, 3, seed=5)
    for (x1, y1), (x2, y2) in zip(_take(local, 12), _take(piped, 12), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def _training_stream(prepared_dir: str, **kw) -> TokenStream:
    return TokenStream(prepared_dir, "train", SEQ_LEN, BATCH, seed=SEED, shuffle_block_shards=BLOCK_SHARDS, **kw)


def _epoch_order(index: dict, epoch: int) -> list[str]:
    """The training shards in the epoch's order: index order shuffled with random.Random(seed + epoch)."""
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    random.Random(SEED + epoch).shuffle(files)
    return files


def _with_a_truncated_train_shard(tiny_prepared, tmp_path, victim: str) -> str:
    """A copy of the prepared corpus whose training shard `victim` was cut mid-transfer."""
    cfg, _ = tiny_prepared
    copy = tmp_path / "prepared"
    shutil.copytree(cfg.prepared_dir, copy)
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[: len(data) // 2])
    return str(copy)


def _packed_tokens(prepared_dir: str, files: list[str]) -> np.ndarray:
    """The files' documents concatenated, read with plain webdataset."""
    ds = wds.WebDataset([f"{prepared_dir}/{f}" for f in files], shardshuffle=False).decode()
    return np.concatenate([s["tokens.npy"] for s in ds]).astype(np.int64)


def _planned_blocks(index: dict, epoch: int) -> list[tuple[list[str], int]]:
    """The epoch's blocks: their shards, and the number of windows index.json's token counts plan for each."""
    n_tokens = {s["file"]: s["n_tokens"] for s in index["splits"]["train"]["shards"]}
    order = _epoch_order(index, epoch)
    blocks = [order[i : i + BLOCK_SHARDS] for i in range(0, len(order), BLOCK_SHARDS)]
    return [(names, (sum(n_tokens[n] for n in names) - 1) // SEQ_LEN) for names in blocks]


def _expected_rows(prepared_dir: str, index: dict, victim: str, epoch: int) -> np.ndarray:
    """The windows (n, T + 1) the stream emits in an epoch when `victim` is skipped, built without TokenStream.

    Every block emits its planned windows in the order of the (seed, epoch, block) permutation; the block that
    lost a shard serves its readable windows in their place, planned window w becoming readable window
    w mod (number of readable windows), so that cursors and resume states stay those index.json implies.
    """
    rows = []
    for block, (names, planned) in enumerate(_planned_blocks(index, epoch)):
        tokens = _packed_tokens(prepared_dir, [n for n in names if n != victim])
        readable = (tokens.size - 1) // SEQ_LEN
        windows = tokens[np.arange(readable)[:, None] * SEQ_LEN + np.arange(SEQ_LEN + 1)]
        rows.append(windows[np.random.default_rng([SEED, epoch, block]).permutation(planned) % readable])
    return np.concatenate(rows)


def _assert_batches_are(batches, rows: np.ndarray) -> None:
    """Batch k's inputs and targets are rows[k * B : (k + 1) * B] without their last and first token."""
    assert len(rows) == BATCH * len(batches)
    for k, (inputs, targets) in enumerate(batches):
        expected = torch.from_numpy(rows[k * BATCH : (k + 1) * BATCH])
        assert torch.equal(inputs, expected[:, :-1]), f"inputs of batch {k}"
        assert torch.equal(targets, expected[:, 1:]), f"targets of batch {k}"


def test_a_corrupt_training_shard_is_skipped_counted_and_named(tiny_prepared, tmp_path, caplog):
    _, index = tiny_prepared
    victim = index["splits"]["train"]["shards"][1]["file"]
    copy = _with_a_truncated_train_shard(tiny_prepared, tmp_path, victim)
    stream = _training_stream(copy)
    rows = _expected_rows(copy, index, victim, epoch=0)
    n_batches = len(rows) // BATCH  # the whole epoch, and not one window of the next
    with caplog.at_level(logging.WARNING):
        batches = _take(stream, n_batches)
    _assert_batches_are(batches, rows[: n_batches * BATCH])
    assert stream.skips.count == 1  # the victim's block is read once an epoch
    assert [r.getMessage() for r in caplog.records if "skipping corrupt shard" in r.getMessage()] == [
        f"skipping corrupt shard {copy}/{victim}: {stream.skips.skipped[0].reason}"
    ]


def test_a_stream_resumed_after_a_skip_reads_the_same_batches(tiny_prepared, tmp_path):
    # A state saved in the middle of the block that lost a shard resumes there, skipping the shard again.
    _, index = tiny_prepared
    victim = index["splits"]["train"]["shards"][1]["file"]
    copy = _with_a_truncated_train_shard(tiny_prepared, tmp_path, victim)
    blocks = _planned_blocks(index, 0)
    at = next(b for b, (names, _) in enumerate(blocks) if victim in names)
    middle = sum(planned for _, planned in blocks[:at]) + blocks[at][1] // 2  # a window of the victim's block
    taken, following = middle // BATCH, 4
    stream = _training_stream(copy)
    _take(stream, taken)
    resumed = _training_stream(copy)
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))  # as if stored in a checkpoint
    rows = _expected_rows(copy, index, victim, epoch=0)[taken * BATCH : (taken + following) * BATCH]
    _assert_batches_are(_take(resumed, following), rows)
    _assert_batches_are(_take(stream, following), rows)
    assert resumed.skips.count == stream.skips.count == 1


def test_a_corrupt_validation_shard_fails_loudly(tiny_prepared, tmp_path):
    cfg, index = tiny_prepared
    copy = tmp_path / "prepared"
    shutil.copytree(cfg.prepared_dir, copy)
    victim = index["splits"]["val"]["shards"][0]["file"]
    (copy / victim).write_bytes(b"\0garbage" * 100)
    with pytest.raises(CorruptShardError, match=victim):
        eval_batches(str(copy), 8, 2, 4)


# Global mode: both workers have rows in the epoch's first block, so both read it (and skip its corrupt shard);
# shards mode: the epoch's first shard belongs to reader 0 alone, i.e. to worker 0.
@pytest.mark.parametrize(("split_mode", "readers_of_first_shard"), [("global", 2), ("shards", 1)])
def test_shards_skipped_by_dataloader_workers_are_counted_here(tiny_prepared, tmp_path, split_mode,
                                                               readers_of_first_shard):
    from data_pipeline.stream import StreamLoader, skipped_shards

    _, index = tiny_prepared
    order = _epoch_order(index, 0)
    victim = order[0]
    copy = _with_a_truncated_train_shard(tiny_prepared, tmp_path, victim)
    loader = StreamLoader(_training_stream(copy, num_workers=2, split_mode=split_mode))
    start = loader.state_dict()
    # Each worker takes its first batch from the first block it reads, which holds the victim; the victim comes
    # back only in the next epoch, beyond the batches taken here and those the workers prefetch (2 each).
    taken, prefetched = 4, 2 * 2
    first_block = order[:BLOCK_SHARDS] if split_mode == "global" else order[0::2][:BLOCK_SHARDS]  # reader 0's
    n_tokens = {s["file"]: s["n_tokens"] for s in index["splits"]["train"]["shards"]}
    assert (sum(n_tokens[n] for n in first_block) - 1) // SEQ_LEN > (taken + prefetched) * BATCH
    for _ in range(taken):
        next(loader)
    assert skipped_shards(loader) == readers_of_first_shard  # each worker counted it in its shared slot
    loader.close()  # stopped workers' counts are kept
    assert skipped_shards(loader) == readers_of_first_shard
    loader.load_state_dict(start)  # new workers read the first block again, and add their skips
    for _ in range(taken):
        next(loader)
    assert skipped_shards(loader) == 2 * readers_of_first_shard
    loader.close()
