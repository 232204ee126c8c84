"""MixtureStream (weighted corpora, exact resume) and the streaming fields of DataConfig."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, parse_mixture
from data_pipeline.mixture import MixtureStream
from data_pipeline.stream import TokenStream


class _Counter:
    """A stand-in component: batch k is filled with (component id, k); its state is k."""

    seq_len, micro_batch_size = 2, 1

    def __init__(self, ident: int) -> None:
        self.ident, self.k = ident, 0

    def __next__(self):
        self.k += 1
        x = torch.tensor([[self.ident, self.k - 1]])
        return x, x

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = state["k"]


def _tokens(cfg, seed, batch=4, **kw) -> TokenStream:
    return TokenStream(cfg.prepared_dir, "train", 16, batch, seed, **kw)


def _mixture(cfg, batch=4, state=None, **kw) -> MixtureStream:
    # Two "corpora": the same prepared data under two seeds, so their sequences differ.
    mix = MixtureStream([_tokens(cfg, 11, batch, **kw), _tokens(cfg, 12, batch, **kw)], [0.7, 0.3], seed=5)
    if state is not None:
        mix.load_state_dict(json.loads(json.dumps(state)))  # as if stored in a checkpoint
    return mix


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("weights", [[0.7, 0.3], [5, 3, 2]])
def test_realised_proportions_follow_the_weights(weights):
    mix = MixtureStream([_Counter(i) for i in range(len(weights))], weights, seed=3)
    drawn = np.array([int(x[0, 0]) for x, _ in islice(mix, 2000)])
    realised = np.bincount(drawn, minlength=len(weights)) / drawn.size
    np.testing.assert_allclose(
        realised, np.array(weights) / sum(weights), atol=0.04
    )  # ~4 standard deviations
    assert mix.counts == np.bincount(drawn).tolist()
    # Each component's batches come in its own order, none skipped.
    pairs = [
        (int(x[0, 0]), int(x[0, 1]))
        for x, _ in islice(MixtureStream([_Counter(0), _Counter(1)], [1, 1], 3), 300)
    ]
    for i in range(2):
        ks = [k for ident, k in pairs if ident == i]
        assert ks == list(range(len(ks)))
    other_seed = [int(x[0, 0]) for x, _ in islice(MixtureStream([_Counter(0), _Counter(1)], [1, 1], 4), 50)]
    assert other_seed != [
        int(x[0, 0]) for x, _ in islice(MixtureStream([_Counter(0), _Counter(1)], [1, 1], 3), 50)
    ]


@pytest.mark.parametrize("k", [0, 9, 23])
def test_mixture_resumes_exactly(tiny_prepared, k):
    cfg, _ = tiny_prepared
    want = list(islice(_mixture(cfg), 40))
    mix = _mixture(cfg)
    list(islice(mix, k))
    state = mix.state_dict()
    assert sum(state["counts"]) == k and [c["batches"] for c in state["components"]] == state["counts"]
    resumed = _mixture(cfg, state=state)
    assert _same(list(islice(resumed, 40 - k)), want[k:]), f"resumed after {k} batches"
    # The batches are the components' own sequences, interleaved.
    solo = [_tokens(cfg, 11), _tokens(cfg, 12)]
    first = [next(solo[0]), next(solo[1])]
    assert any(_same([w], [first[0]]) for w in want[:5]) and any(_same([w], [first[1]]) for w in want[:10])


def test_mixture_is_dp_layout_independent_in_global_mode(tiny_prepared):
    # Every rank draws the same component per global micro-step, so dp=2 x B=4 concatenates to dp=1 x B=8.
    cfg, _ = tiny_prepared
    single = list(islice(_mixture(cfg, batch=8), 12))
    ranks = [_mixture(cfg, batch=4, dp_rank=r, dp_world_size=2) for r in range(2)]
    for j, want in enumerate(single):
        got = [next(r) for r in ranks]
        assert torch.equal(torch.cat([x for x, _ in got]), want[0]), f"global micro-step {j}"


def test_mixture_state_is_validated(tiny_prepared):
    cfg, _ = tiny_prepared
    mix = _mixture(cfg)
    list(islice(mix, 3))
    state = json.loads(json.dumps(mix.state_dict()))
    with pytest.raises(ValueError, match="saved with weights="):
        MixtureStream([_tokens(cfg, 11), _tokens(cfg, 12)], [0.5, 0.5], seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with seed="):
        MixtureStream([_tokens(cfg, 11), _tokens(cfg, 12)], [0.7, 0.3], seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="has 2 components, this one 3"):
        three = MixtureStream([_tokens(cfg, s) for s in (11, 12, 13)], [7, 3, 1], seed=5)
        three.load_state_dict({**state, "weights": [7.0, 3.0, 1.0]})
    with pytest.raises(ValueError, match="component 1: TokenStream state was saved with seed=12"):
        MixtureStream([_tokens(cfg, 11), _tokens(cfg, 13)], [0.7, 0.3], seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="kind 'mixture'"):
        _mixture(cfg).load_state_dict(_tokens(cfg, 11).state_dict())
    with pytest.raises(ValueError, match="share seq_len and micro_batch_size"):
        MixtureStream([_tokens(cfg, 11), _tokens(cfg, 12, batch=5)], [1, 1], seed=5)
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        MixtureStream([_tokens(cfg, 11), _tokens(cfg, 12)], [1, 0], seed=5)


def test_streaming_config_fields_are_validated():
    cfg = DataConfig(split="shards", num_workers=2, mixture="data/web:0.7, data/code:0.3")
    assert parse_mixture(cfg.mixture) == [("data/web", 0.7), ("data/code", 0.3)]
    assert parse_mixture(DataConfig().mixture) == []
    for kw, message in [
        (dict(split="nodes"), "data.split must be one of"),
        (dict(num_workers=-1), "data.num_workers must be >= 0"),
        (dict(mixture="data/web"), "data.mixture entry 'data/web'"),
        (dict(mixture="data/web:0.7,data/code:-1"), "data.mixture entry 'data/code:-1'"),
        (dict(mixture="data/web:x"), "data.mixture entry"),
        (dict(mixture="a:1,a:2"), "data.mixture names a prepared_dir twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            DataConfig(**kw)


def test_a_mixture_of_worker_loaders_draws_the_same_batches_and_resumes(tiny_prepared):
    from data_pipeline.stream import StreamLoader

    cfg, _ = tiny_prepared

    def with_workers(state=None) -> MixtureStream:
        loaders = [StreamLoader(_tokens(cfg, seed, num_workers=2)) for seed in (11, 12)]
        mix = MixtureStream(loaders, [0.7, 0.3], seed=5)
        if state is not None:
            mix.load_state_dict(json.loads(json.dumps(state)))
        return mix

    want = list(islice(_mixture(cfg), 30))  # the same mixture read in this process
    mix = with_workers()
    assert _same(list(islice(mix, 12)), want[:12])  # global mode: workers do not change the sequence
    state = mix.state_dict()
    mix.close()
    resumed = with_workers(state)
    assert _same(list(islice(resumed, 18)), want[12:])
    resumed.close()
