"""TokenStream split_mode="shards" and StreamLoader (DataLoader workers): shard splits and exact resume."""

from __future__ import annotations

import json
import random
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.stream import StreamLoader, TokenStream


def _packed_tokens(cfg, files) -> np.ndarray:
    """The documents of files concatenated, read with plain webdataset."""
    ds = wds.WebDataset([str(Path(cfg.prepared_dir) / f) for f in files], shardshuffle=False).decode()
    return np.concatenate([s["tokens.npy"] for s in ds]).astype(np.int64)


def _rows(batches) -> np.ndarray:
    """The windows of seq_len + 1 tokens that batches' rows were cut from: (n_rows, T + 1)."""
    return np.concatenate([torch.cat([x, y[:, -1:]], dim=1).numpy() for x, y in batches])


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def _stream(cfg, batch=8, seed=11, **kw) -> TokenStream:
    return TokenStream(cfg.prepared_dir, "train", 16, batch, seed, **kw)


def _loader(cfg, state=None, **kw) -> StreamLoader:
    loader = StreamLoader(_stream(cfg, **kw))
    if state is not None:
        loader.load_state_dict(json.loads(json.dumps(state)))  # as if stored in a checkpoint
    return loader


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )


def _reader_windows(cfg, index, epoch, reader, n_readers, seed=11, block_shards=4) -> np.ndarray:
    """Every window of seq_len + 1 = 17 tokens of one shards-mode reader's epoch, from its blocks of shards."""
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    random.Random(seed + epoch).shuffle(files)
    mine = files[reader::n_readers]
    windows = []
    for i in range(0, len(mine), block_shards):
        tokens = _packed_tokens(cfg, mine[i : i + block_shards])
        windows.append(tokens[np.arange((tokens.size - 1) // 16)[:, None] * 16 + np.arange(17)])
    return np.concatenate(windows)


def test_shards_mode_readers_read_their_own_shards(tiny_prepared):
    cfg, index = tiny_prepared
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    for epoch in range(2):
        order = list(files)
        random.Random(11 + epoch).shuffle(order)
        for r in range(2):
            stream = _stream(cfg, dp_rank=r, dp_world_size=2, num_workers=2, split_mode="shards")
            for role in range(2):
                stream._set_role(role)
                assert stream._epoch_shards(epoch) == order[2 * r + role :: 4]  # by rank, then by worker
    # A dp rank's loop=False epoch: every window of its own shards once, nothing else; other ranks differ.
    epochs = []
    for r in range(2):
        got = _rows(list(_stream(cfg, batch=1, dp_rank=r, dp_world_size=2, split_mode="shards", loop=False)))
        want = _reader_windows(cfg, index, 0, r, 2)
        np.testing.assert_array_equal(_sorted_rows(got), _sorted_rows(want))
        assert not np.array_equal(got, want), "windows are permuted within blocks"
        epochs.append(got)
    assert len(epochs[0]) != len(epochs[1]) or not np.array_equal(epochs[0], epochs[1])


def test_shards_mode_state_is_the_same_on_every_rank(tiny_prepared):
    # Rank 0 saves; each rank continues its own sequence from that state, across epoch boundaries.
    cfg, _ = tiny_prepared
    kw = dict(dp_world_size=2, split_mode="shards")
    ranks = [_stream(cfg, dp_rank=r, **kw) for r in range(2)]
    epoch_batches = ranks[1]._layout_of(0).n_windows // 8
    n = 2 * epoch_batches + 10  # into rank 1's third epoch
    runs = [list(islice(s, n)) for s in ranks]
    assert ranks[1]._epoch == 2
    for k in (0, 7, epoch_batches + 3, n - 5):
        probe = _stream(cfg, dp_rank=0, **kw)
        list(islice(probe, k))
        state = json.loads(json.dumps(probe.state_dict()))
        assert state["batches"] == k and "window" not in state
        for r in range(2):
            resumed = _stream(cfg, dp_rank=r, **kw)
            resumed.load_state_dict(state)
            assert not resumed._blocks, "loading a state must not read shards"
            assert _same(list(islice(resumed, 5)), runs[r][k : k + 5]), f"rank {r} resumed after {k}"


def test_shards_mode_state_is_checked(tiny_prepared):
    cfg, index = tiny_prepared
    stream = _stream(cfg, split_mode="shards", dp_world_size=2)
    next(stream)
    state = stream.state_dict()
    for kw, key in [
        (dict(dp_world_size=3), "dp_world_size"),
        (dict(dp_world_size=2, batch=4), "micro_batch_size"),
        (dict(dp_world_size=2, split_mode="global"), "split_mode"),
    ]:
        with pytest.raises(ValueError, match=f"saved with {key}="):
            _stream(cfg, **{"split_mode": "shards", **kw}).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with num_workers=0, this stream has num_workers=2"):
        _stream(cfg, split_mode="shards", dp_world_size=2, num_workers=2).load_state_dict(state)
    _stream(cfg, split_mode="shards", dp_world_size=2, num_workers=1).load_state_dict(state)  # one reader too
    n = len(index["splits"]["train"]["shards"])
    with pytest.raises(ValueError, match=f"needs at least .* = {n + 1} shards"):
        _stream(cfg, split_mode="shards", dp_world_size=n + 1)
    with pytest.raises(ValueError, match="split_mode must be one of"):
        _stream(cfg, split_mode="nodes")
    with pytest.raises(RuntimeError, match="read through StreamLoader"):
        next(_stream(cfg, num_workers=2))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_global_mode_workers_give_the_zero_worker_sequence(tiny_prepared):
    cfg, _ = tiny_prepared
    kw = dict(dp_rank=1, dp_world_size=2)
    plain = _stream(cfg, **kw)
    n = plain._layout_of(0).n_windows // 16 + 6  # past the end of epoch 0
    want, states = [], []
    for _ in range(n):
        want.append(next(plain))
        states.append(plain.state_dict())
    loader = _loader(cfg, num_workers=2, **kw)
    got = []
    for k in range(n):
        got.append(next(loader))
        assert loader.state_dict() == {**states[k], "num_workers": 2}, f"state after {k + 1} batches"
    assert _same(got, want)
    # Saved at 7 batches with 2 workers: resumed with 2, 3 or 0 workers, the same continuation.
    state = {**states[6], "num_workers": 2}
    for workers in (2, 3, 0):
        assert _same(list(islice(_loader(cfg, state, num_workers=workers, **kw), n - 7)), want[7:]), workers
    # loop=False: the same whole global micro-steps of one epoch.
    one_epoch = list(_stream(cfg, loop=False, **kw))
    assert _same(list(_loader(cfg, num_workers=2, loop=False, **kw)), one_epoch)


@pytest.mark.parametrize("k", [0, 5, 12])
def test_shards_mode_workers_resume_exactly(tiny_prepared, k):
    cfg, index = tiny_prepared
    kw = dict(dp_rank=1, dp_world_size=2, num_workers=2, split_mode="shards", batch=16)
    want = list(islice(_loader(cfg, **kw), 30))
    loader = _loader(cfg, **kw)
    list(islice(loader, k))
    state = loader.state_dict()
    assert state["batches"] == k and state["num_workers"] == 2
    assert _same(list(islice(_loader(cfg, state, **kw), 30 - k)), want[k:]), f"resumed after {k}"
    with pytest.raises(ValueError, match="saved with num_workers=2, this stream has num_workers=3"):
        _loader(cfg, state, **{**kw, "num_workers": 3})
    if k == 0:  # batch j comes from worker j % 2, i.e. reader 2 * dp_rank + j % 2 of 4, and only its shards
        for j, batch in enumerate(want[:8]):
            mine = {row.tobytes() for row in _reader_windows(cfg, index, 0, 2 + j % 2, 4)}
            assert all(row.tobytes() in mine for row in _rows([batch])), f"batch {j}"
