"""TokenStream: packing, shapes, data-parallel sharding and exact resume."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.stream import TokenStream, eval_batches


def _packed_tokens(cfg, index, split, files=None) -> np.ndarray:
    """The split's documents concatenated in shard order, read with plain webdataset."""
    files = files if files is not None else [s["file"] for s in index["splits"][split]["shards"]]
    ds = wds.WebDataset([str(Path(cfg.prepared_dir) / f) for f in files], shardshuffle=False).decode()
    return np.concatenate([s["tokens.npy"] for s in ds]).astype(np.int64)


def _stream(cfg, split="train", seq_len=16, batch=3, seed=11, **kw) -> TokenStream:
    return TokenStream(cfg.prepared_dir, split, seq_len, batch, seed, **kw)


def _resumed(cfg, state, **kw) -> TokenStream:
    stream = _stream(cfg, **kw)
    stream.load_state_dict(json.loads(json.dumps(state)))  # as if stored in a checkpoint
    return stream


def test_shapes_dtypes_and_shift(tiny_prepared):
    cfg, _ = tiny_prepared
    prev = None
    for inputs, targets in islice(_stream(cfg, seq_len=16, batch=3), 50):
        assert inputs.shape == targets.shape == (3, 16)
        assert inputs.dtype == targets.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert torch.equal(inputs[1:, 0], targets[:-1, -1])  # rows are consecutive windows
        if prev is not None:
            assert inputs[0, 0] == prev[-1, -1]  # and so are batches
        prev = targets


def test_packs_documents_across_boundaries(tiny_prepared):
    cfg, index = tiny_prepared
    B, T = 4, 8
    expected = _packed_tokens(cfg, index, "train")
    batches = list(_stream(cfg, seq_len=T, batch=B, loop=False, shuffle=False))
    assert len(batches) == (expected.size - 1) // (B * T)  # one epoch, remainder dropped
    inputs = torch.cat([x.reshape(-1) for x, _ in batches]).numpy()
    targets = torch.cat([y.reshape(-1) for _, y in batches]).numpy()
    np.testing.assert_array_equal(inputs, expected[: inputs.size])
    np.testing.assert_array_equal(targets, expected[1 : inputs.size + 1])
    assert (inputs == index["eot_id"]).sum() > 5  # many documents packed into the batches


def test_dp_ranks_get_disjoint_shards(tiny_prepared):
    cfg, index = tiny_prepared
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    ranks = [_stream(cfg, dp_rank=r, dp_world_size=3) for r in range(3)]
    for epoch in range(4):
        per_rank = [set(s._epoch_shards(epoch)) for s in ranks]
        assert set().union(*per_rank) == set(files)
        assert sum(len(p) for p in per_rank) == len(files)
    orders = {tuple(ranks[0]._epoch_shards(e)) for e in range(6)}
    assert len(orders) > 1, "shard order should change between epochs"
    # The tokens a rank streams are exactly its shards' tokens.
    for r in range(2):
        stream = _stream(cfg, seq_len=8, batch=2, dp_rank=r, dp_world_size=2, loop=False, shuffle=False)
        got = torch.cat([x.reshape(-1) for x, _ in stream]).numpy()
        np.testing.assert_array_equal(got, _packed_tokens(cfg, index, "train", files[r::2])[: got.size])


def test_more_ranks_than_shards_is_an_error(tiny_prepared):
    cfg, index = tiny_prepared
    n = len(index["splits"]["val"]["shards"])
    with pytest.raises(ValueError, match=f"{n} shards, fewer than dp_world_size={n + 1}"):
        _stream(cfg, split="val", dp_rank=0, dp_world_size=n + 1)


@pytest.mark.parametrize("seq_len, batch, dp_rank, dp_world_size", [(16, 3, 0, 1), (7, 5, 1, 2)])
def test_exact_resume_at_every_step(tiny_prepared, seq_len, batch, dp_rank, dp_world_size):
    cfg, _ = tiny_prepared
    kw = dict(seq_len=seq_len, batch=batch, dp_rank=dp_rank, dp_world_size=dp_world_size)
    stream = _stream(cfg, **kw)
    states, batches = [stream.state_dict()], []
    while states[-1]["epoch"] < 3:  # three epochs: several epoch and many shard boundaries
        batches.append(next(stream))
        states.append(stream.state_dict())
    crossed = {"epoch": 0, "shard": 0}
    for k in range(0, len(batches) - 3):
        resumed = _resumed(cfg, states[k], **kw)
        for want, got in zip(batches[k : k + 3], islice(resumed, 3), strict=True):
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]), f"resume after {k} batches"
        crossed["epoch"] += states[k + 1]["epoch"] != states[k]["epoch"]
        crossed["shard"] += states[k + 1]["shard_pos"] != states[k]["shard_pos"]
    assert crossed["epoch"] >= 2 and crossed["shard"] >= 10
    # And a long continuation from one mid-run state matches the uninterrupted run to the end.
    k = len(batches) // 3
    rest = list(islice(_resumed(cfg, states[k], **kw), len(batches) - k))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[k:], rest, strict=True)
    )


def test_exact_resume_on_shard_and_epoch_boundaries(tiny_prepared):
    # With 1x1 batches a batch ends on every token, so states land exactly on each shard start and on
    # the end of the epoch (shard_pos == number of shards of this rank).
    cfg, _ = tiny_prepared
    kw = dict(seq_len=1, batch=1, dp_rank=1, dp_world_size=2)
    stream = _stream(cfg, **kw)
    states, batches = [stream.state_dict()], []
    while states[-1]["epoch"] < 2:
        batches.append(next(stream))
        states.append(stream.state_dict())
    boundary = [k for k, s in enumerate(states[:-3]) if s["sample"] == 0 and s["offset_in_sample"] == 0]
    n_rank_shards = len(stream._epoch_shards(0))
    assert len(boundary) >= 2 * n_rank_shards - 1
    assert any(states[k]["shard_pos"] == n_rank_shards and states[k]["epoch"] == 0 for k in boundary)
    for k in boundary:
        got = list(islice(_resumed(cfg, states[k], **kw), 3))
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(batches[k : k + 3], got, strict=True)
        )
    # The loop=False stream ends exactly where the epoch does.
    one_epoch = list(_stream(cfg, loop=False, **kw))
    first_epoch_1 = next(k for k, s in enumerate(states) if s["epoch"] == 1)
    # A rank-epoch of N tokens: the state leaves epoch 0 after N + 1 one-token batches (the batch on the
    # last token peeks its target in epoch 1); alone, the epoch gives N - 1 (the last token is only a target).
    assert len(one_epoch) == first_epoch_1 - 2


def test_state_dict_is_json_and_validated(tiny_prepared):
    cfg, _ = tiny_prepared
    stream = _stream(cfg)
    list(islice(stream, 7))
    state = json.loads(json.dumps(stream.state_dict()))
    for kw, key in [
        (dict(split="val"), "split"),
        (dict(seq_len=32), "seq_len"),
        (dict(seed=12), "seed"),
        (dict(dp_rank=1, dp_world_size=2), "dp_rank"),
    ]:
        with pytest.raises(ValueError, match=f"saved with {key}="):
            _stream(cfg, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="sample="):
        _stream(cfg).load_state_dict({**state, "sample": 10_000})
    with pytest.raises(ValueError, match="version"):
        _stream(cfg).load_state_dict({})


def test_eval_batches_are_the_unshuffled_val_start(tiny_prepared):
    cfg, index = tiny_prepared
    first = eval_batches(cfg.prepared_dir, seq_len=8, micro_batch_size=2, max_batches=5)
    again = eval_batches(cfg.prepared_dir, seq_len=8, micro_batch_size=2, max_batches=5)
    assert len(first) == 5 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    expected = _packed_tokens(cfg, index, "val")
    np.testing.assert_array_equal(torch.cat([x.reshape(-1) for x, _ in first]).numpy(), expected[:80])
    everything = eval_batches(cfg.prepared_dir, seq_len=8, micro_batch_size=2, max_batches=10**9)
    assert len(everything) == (expected.size - 1) // 16
    with pytest.raises(ValueError, match="shorter than one batch"):
        eval_batches(cfg.prepared_dir, seq_len=expected.size, micro_batch_size=1, max_batches=1)
