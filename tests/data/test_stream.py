"""TokenStream: packing, block-shuffled windows, shapes, data-parallel slicing and exact resume."""

from __future__ import annotations

import json
import random
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


def _rows(batches) -> np.ndarray:
    """The windows of seq_len + 1 tokens that batches' rows were cut from: (n_rows, T + 1)."""
    return np.concatenate([torch.cat([x, y[:, -1:]], dim=1).numpy() for x, y in batches])


def _reference_blocks(cfg, index, epoch, seed=11, seq_len=16, shuffle_block_shards=4):
    """Per block of the epoch: its sequential windows (n, T + 1), built independently of TokenStream."""
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    random.Random(seed + epoch).shuffle(files)
    blocks = []
    for i in range(0, len(files), shuffle_block_shards):
        tokens = _packed_tokens(cfg, index, "train", files[i : i + shuffle_block_shards])
        n = (tokens.size - 1) // seq_len
        blocks.append(tokens[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)])
    return blocks


def _epoch_rows(cfg, epoch, **kw) -> np.ndarray:
    """The windows a looping stream emits in the given epoch, in order."""
    stream = _stream(cfg, batch=1, **kw)
    stream.load_state_dict({**stream.state_dict(), "epoch": epoch})
    n = stream._layout_of(epoch).n_windows
    return _rows(islice(stream, n))


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def _resumed(cfg, state, **kw) -> TokenStream:
    stream = _stream(cfg, **kw)
    stream.load_state_dict(json.loads(json.dumps(state)))  # as if stored in a checkpoint
    return stream


@pytest.mark.parametrize("shuffle", [True, False])
def test_shapes_dtypes_and_shift(tiny_prepared, shuffle):
    cfg, _ = tiny_prepared
    prev = None
    for inputs, targets in islice(_stream(cfg, seq_len=16, batch=3, shuffle=shuffle), 50):
        assert inputs.shape == targets.shape == (3, 16)
        assert inputs.dtype == targets.dtype == torch.long
        assert inputs.is_contiguous() and targets.is_contiguous()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        if not shuffle:
            assert torch.equal(inputs[1:, 0], targets[:-1, -1])  # rows are consecutive windows
            if prev is not None:
                assert inputs[0, 0] == prev[-1, -1]  # and so are batches
        prev = targets


@pytest.mark.parametrize("block_shards", [4, 3, 1, 2, 10])
def test_shuffled_epoch_is_a_permutation_of_each_blocks_windows(tiny_prepared, block_shards):
    cfg, index = tiny_prepared
    kw = dict(shuffle_block_shards=block_shards)
    for epoch in range(2):
        blocks = _reference_blocks(cfg, index, epoch, **kw)
        rows = _epoch_rows(cfg, epoch, **kw)
        assert len(rows) == sum(len(b) for b in blocks)
        start = 0
        for b, windows in enumerate(blocks):
            got = rows[start : start + len(windows)]
            # Every window of the block exactly once, in the order of the (seed, epoch, block) permutation.
            np.testing.assert_array_equal(_sorted_rows(got), _sorted_rows(windows))
            np.testing.assert_array_equal(
                got, windows[np.random.default_rng([11, epoch, b]).permutation(len(windows))]
            )
            start += len(windows)
    # loop=False: one epoch of whole batches, the last partial batch dropped.
    n = len(_epoch_rows(cfg, 0, **kw))
    one_epoch = list(_stream(cfg, batch=5, loop=False, **kw))
    assert len(one_epoch) == n // 5
    np.testing.assert_array_equal(_rows(one_epoch), _epoch_rows(cfg, 0, **kw)[: 5 * (n // 5)])


def test_shuffled_batches_mix_the_block(tiny_prepared):
    cfg, index = tiny_prepared
    B = 8
    batches = list(islice(_stream(cfg, batch=B), 20))
    # Sequential windows chain (row b's last target is row b + 1's first input); shuffled rows rarely do.
    chained = sum(int((x[1:, 0] == y[:-1, -1]).sum()) for x, y in batches)
    assert chained < 0.3 * len(batches) * (B - 1)
    # A batch's rows come from far apart in the block: their window indices span much more than B.
    windows = _reference_blocks(cfg, index, 0)[0]
    where = {row.tobytes(): w for w, row in enumerate(windows)}
    first = [where[row.tobytes()] for row in _rows(batches[:1])]
    assert max(first) - min(first) > 3 * B and first != sorted(first)


def test_shuffled_order_depends_on_seed_and_epoch(tiny_prepared):
    cfg, _ = tiny_prepared
    e0, e1 = _epoch_rows(cfg, 0), _epoch_rows(cfg, 1)
    other_seed = _epoch_rows(cfg, 0, seed=12)
    assert len(e0) == len(other_seed)
    assert not np.array_equal(e0[:20], e1[:20])
    assert not np.array_equal(e0, other_seed)
    np.testing.assert_array_equal(e0, _epoch_rows(cfg, 0))  # and is deterministic
    # Same seed and shard order but another block size: other blocks, so another order.
    assert not np.array_equal(e0[:20], _epoch_rows(cfg, 0, shuffle_block_shards=2)[:20])


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


def test_unshuffled_dp_ranks_get_disjoint_shards(tiny_prepared):
    cfg, index = tiny_prepared
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    ranks = [_stream(cfg, dp_rank=r, dp_world_size=3, shuffle=False) for r in range(3)]
    per_rank = [ranks[r]._epoch_shards(0) for r in range(3)]
    assert per_rank == [files[r::3] for r in range(3)]
    # The tokens a rank streams are exactly its shards' tokens.
    for r in range(2):
        stream = _stream(cfg, seq_len=8, batch=2, dp_rank=r, dp_world_size=2, loop=False, shuffle=False)
        got = torch.cat([x.reshape(-1) for x, _ in stream]).numpy()
        np.testing.assert_array_equal(got, _packed_tokens(cfg, index, "train", files[r::2])[: got.size])


def test_shuffled_shard_order_is_global_and_changes_per_epoch(tiny_prepared):
    cfg, index = tiny_prepared
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    ranks = [_stream(cfg, dp_rank=r, dp_world_size=3) for r in range(3)]
    for epoch in range(4):
        orders = [s._epoch_shards(epoch) for s in ranks]
        assert orders[0] == orders[1] == orders[2] == _stream(cfg)._epoch_shards(epoch)  # no dp split
        assert sorted(orders[0]) == sorted(files)
    assert len({tuple(ranks[0]._epoch_shards(e)) for e in range(6)}) > 1, "order should change per epoch"


def _cat(batches) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.mark.parametrize("dp, batch, block_shards", [(2, 4, 4), (3, 3, 2), (3, 5, 1)])
def test_dp_ranks_slice_the_global_micro_batch(tiny_prepared, dp, batch, block_shards):
    # Rank r's batch k is rows [r*B, (r+1)*B) of the dp=1 stream's batch k of dp*B rows, across block and
    # epoch boundaries: the same global sample order at any dp size.
    cfg, _ = tiny_prepared
    kw = dict(shuffle_block_shards=block_shards)
    single = _stream(cfg, batch=dp * batch, **kw)
    ranks = [_stream(cfg, batch=batch, dp_rank=r, dp_world_size=dp, **kw) for r in range(dp)]
    n_epoch = single._layout_of(0).n_windows
    n_steps = 2 * n_epoch // (dp * batch) + 2  # into the third epoch
    crossed = {"epoch": 0, "block": 0}
    prev = single.state_dict()
    for k in range(n_steps):
        want = next(single)
        got = [next(s) for s in ranks]
        for x, y in got:
            assert x.shape == y.shape == (batch, 16)
        cat = _cat(got)
        assert torch.equal(cat[0], want[0]) and torch.equal(cat[1], want[1]), f"global micro-step {k}"
        state = single.state_dict()
        assert all(s.state_dict() == {**state, "dp_world_size": dp, "micro_batch_size": batch} for s in ranks)
        first_window = single._layout_of(prev["epoch"]).first_window
        crossed["epoch"] += state["epoch"] != prev["epoch"]
        crossed["block"] += state["epoch"] == prev["epoch"] and bool(
            np.searchsorted(first_window, prev["window"], side="right")
            != np.searchsorted(first_window, state["window"], side="right")
        )
        prev = state
    assert crossed["epoch"] >= 2 and crossed["block"] >= 3
    # The ranks' windows in an epoch are disjoint and together are the epoch (up to a partial last step).
    rows = [
        _rows(list(_stream(cfg, batch=batch, dp_rank=r, dp_world_size=dp, loop=False, **kw)))
        for r in range(dp)
    ]
    n = (n_epoch // (dp * batch)) * dp * batch
    everything = _epoch_rows(cfg, 0, **kw)[:n]
    np.testing.assert_array_equal(_sorted_rows(np.concatenate(rows)), _sorted_rows(everything))
    # loop=False: the same number of whole global micro-steps on every rank, as the dp=1 stream's batches.
    assert all(len(r) == n // dp for r in rows)
    assert len(list(_stream(cfg, batch=dp * batch, loop=False, **kw))) == n // (dp * batch)


def test_dp_rank_loads_only_the_blocks_it_reads(tiny_prepared):
    cfg, _ = tiny_prepared
    kw = dict(shuffle_block_shards=1, dp_world_size=2)
    probe = _stream(cfg, **kw)
    first_window = probe._layout_of(0).first_window
    n0 = int(first_window[1])  # with batch n0, rank 0's first batch is block 0, rank 1's starts block 1
    assert 0 < n0 < first_window[2] - n0
    ranks = [_stream(cfg, batch=n0, dp_rank=r, **kw) for r in range(2)]
    for s in ranks:
        next(s)
    assert list(ranks[0]._blocks) == [(0, 0)]
    assert list(ranks[1]._blocks) == [(0, 1)]
    assert ranks[0].state_dict()["window"] == ranks[1].state_dict()["window"] == 2 * n0


@pytest.mark.parametrize("k", [0, 13, 97])
def test_shuffled_resume_at_another_dp_size_and_batch_size(tiny_prepared, k):
    cfg, _ = tiny_prepared
    single = _stream(cfg, batch=8)
    list(islice(single, k))
    state = json.loads(json.dumps(single.state_dict()))
    continued = list(islice(single, 110 - k))  # into epoch 1 (an epoch is ~100 batches of 8)
    # As two dp=2, B=4 ranks: rank 0's batch j then rank 1's batch j is the dp=1 stream's batch j, row for row.
    ranks = [_resumed(cfg, state, batch=4, dp_rank=r, dp_world_size=2) for r in range(2)]
    for j, want in enumerate(continued):
        got = _cat([next(s) for s in ranks])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"batch {j} after resume"
    assert ranks[0].state_dict() == {**single.state_dict(), "dp_world_size": 2, "micro_batch_size": 4}
    assert single.state_dict()["epoch"] == 1
    # And back to dp=1 at yet another batch size (dp=3, B=2 saved, dp=1, B=5 resumed): the same windows.
    flat = _rows(continued)
    third = _resumed(cfg, state, batch=2, dp_rank=1, dp_world_size=3)
    steps = [next(third) for _ in range(3)]
    np.testing.assert_array_equal(
        _rows(steps), np.concatenate([flat[6 * j + 2 : 6 * j + 4] for j in range(3)])
    )
    again = _resumed(cfg, third.state_dict(), batch=5)
    np.testing.assert_array_equal(_rows(islice(again, 4)), flat[18:38])


def test_more_ranks_than_shards_is_an_error_only_unshuffled(tiny_prepared):
    cfg, index = tiny_prepared
    n = len(index["splits"]["val"]["shards"])
    with pytest.raises(ValueError, match=f"{n} shards, fewer than dp_world_size={n + 1}"):
        _stream(cfg, split="val", dp_rank=0, dp_world_size=n + 1, shuffle=False)
    # Shuffled, ranks slice windows, not shards: any dp size works.
    single = next(_stream(cfg, split="val", batch=n + 1))
    got = _cat(
        [next(_stream(cfg, split="val", batch=1, dp_rank=r, dp_world_size=n + 1)) for r in range(n + 1)]
    )
    assert torch.equal(got[0], single[0]) and torch.equal(got[1], single[1])


@pytest.mark.parametrize(
    "seq_len, batch, dp_rank, dp_world_size, block_shards",
    [(16, 3, 0, 1, 4), (7, 5, 1, 2, 2), (16, 7, 0, 1, 1), (5, 4, 0, 2, 3)],
)
def test_exact_resume_at_every_step(tiny_prepared, seq_len, batch, dp_rank, dp_world_size, block_shards):
    cfg, _ = tiny_prepared
    kw = dict(
        seq_len=seq_len, batch=batch, dp_rank=dp_rank, dp_world_size=dp_world_size,
        shuffle_block_shards=block_shards,
    )  # fmt: skip
    stream = _stream(cfg, **kw)
    states, batches = [stream.state_dict()], []
    while states[-1]["epoch"] < 3:  # three epochs: several epoch and block boundaries
        batches.append(next(stream))
        states.append(stream.state_dict())

    def block_of(state):
        first_window = stream._layout_of(state["epoch"]).first_window
        return state["epoch"], int(np.searchsorted(first_window, state["window"], side="right"))

    crossed = {"epoch": 0, "block": 0}
    for k in range(0, len(batches) - 3):
        resumed = _resumed(cfg, states[k], **kw)
        assert not resumed._blocks and not resumed._cache, "loading a state must not read shards"
        for want, got in zip(batches[k : k + 3], islice(resumed, 3), strict=True):
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]), f"resume after {k} batches"
        crossed["epoch"] += states[k + 1]["epoch"] != states[k]["epoch"]
        crossed["block"] += block_of(states[k + 1]) != block_of(states[k])
    assert crossed["epoch"] >= 2 and crossed["block"] >= 5
    assert len(stream._blocks) <= 2  # memory: at most the current block and the one a batch spills into
    # And a long continuation from one mid-run state matches the uninterrupted run to the end.
    k = len(batches) // 3
    rest = list(islice(_resumed(cfg, states[k], **kw), len(batches) - k))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[k:], rest, strict=True)
    )


def test_shuffled_resume_on_block_and_epoch_boundaries(tiny_prepared):
    # With one-row batches a state lands on every window: the start of each block and the end of the epoch.
    cfg, _ = tiny_prepared
    kw = dict(seq_len=16, batch=1, shuffle_block_shards=3)
    stream = _stream(cfg, **kw)
    states, batches = [stream.state_dict()], []
    while states[-1]["epoch"] < 2:
        batches.append(next(stream))
        states.append(stream.state_dict())
    first_window = stream._layout_of(0).first_window
    n_windows = int(first_window[-1])
    boundary = [
        k for k, s in enumerate(states[:-3]) if s["epoch"] == 0 and s["window"] in set(first_window.tolist())
    ]
    assert [states[k]["window"] for k in boundary] == first_window.tolist()  # block starts, then epoch end
    assert (states[n_windows]["epoch"], states[n_windows]["window"]) == (0, n_windows)
    for k in boundary:
        got = list(islice(_resumed(cfg, states[k], **kw), 3))
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(batches[k : k + 3], got, strict=True)
        )
    # A state at the end of a loop=False epoch ends that stream; a looping stream goes on into epoch 1.
    with pytest.raises(StopIteration):
        next(_resumed(cfg, states[n_windows], loop=False, **kw))


def test_sequential_exact_resume_at_every_step(tiny_prepared):
    cfg, _ = tiny_prepared
    kw = dict(seq_len=7, batch=5, dp_rank=1, dp_world_size=2, shuffle=False)
    stream = _stream(cfg, **kw)
    states, batches = [stream.state_dict()], []
    while states[-1]["epoch"] < 3:
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


def test_sequential_exact_resume_on_shard_and_epoch_boundaries(tiny_prepared):
    # Unshuffled, with 1x1 batches a batch ends on every token, so states land exactly on each shard start
    # and on the end of the epoch (shard_pos == number of shards of this rank).
    cfg, _ = tiny_prepared
    kw = dict(seq_len=1, batch=1, dp_rank=1, dp_world_size=2, shuffle=False)
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
    assert state["epoch"] == 0 and state["window"] == 21 and state["shuffle_block_shards"] == 4
    for kw, key in [
        (dict(split="val"), "split"),
        (dict(seq_len=32), "seq_len"),
        (dict(seed=12), "seed"),
        (dict(shuffle_block_shards=2), "shuffle_block_shards"),
        (dict(shuffle=False), "shuffle"),
    ]:
        with pytest.raises(ValueError, match=f"saved with {key}="):
            _stream(cfg, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint="):
        _stream(cfg).load_state_dict({**state, "fingerprint": "other"})
    # The dp layout and micro-batch size are not part of a shuffled stream's position.
    _stream(cfg, batch=5, dp_rank=1, dp_world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="window="):
        _stream(cfg).load_state_dict({**state, "window": 10_000})
    with pytest.raises(ValueError, match="version"):
        _stream(cfg).load_state_dict({})
    with pytest.raises(ValueError, match="version"):
        _stream(cfg).load_state_dict({**state, "version": 2})
    sequential = _stream(cfg, shuffle=False)
    list(islice(sequential, 7))
    state = json.loads(json.dumps(sequential.state_dict()))
    with pytest.raises(ValueError, match="sample="):
        _stream(cfg, shuffle=False).load_state_dict({**state, "sample": 10_000})
    for kw, key in [(dict(dp_rank=1, dp_world_size=2), "dp_rank"), (dict(dp_world_size=2), "dp_world_size")]:
        with pytest.raises(ValueError, match=f"saved with {key}="):
            _stream(cfg, shuffle=False, **kw).load_state_dict(state)


def test_shuffled_stream_arguments_are_checked(tiny_prepared):
    cfg, index = tiny_prepared
    with pytest.raises(ValueError, match="shuffle_block_shards must be >= 1, got 0"):
        _stream(cfg, shuffle_block_shards=0)
    biggest_shard = max(s["n_tokens"] for s in index["splits"]["train"]["shards"])
    with pytest.raises(ValueError, match="holds a window of seq_len"):
        _stream(cfg, seq_len=biggest_shard, shuffle_block_shards=1)


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
