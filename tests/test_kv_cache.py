"""The GPT outside training: built with no process group, decoding with a KV cache equals recomputation."""

from __future__ import annotations

import pytest
import torch

from trainer.config import KernelsConfig, ModelConfig
from trainer.kv_cache import KVCache
from trainer.model import GPT, LocalLinear, tensor_parallel_active

VOCAB = 100
CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.fixture(scope="module")
def model() -> GPT:
    assert not tensor_parallel_active()  # megatron's parallel_state is down: plain layers
    return GPT(CFG, KernelsConfig(attention="torch_sdpa", layernorm="torch"), VOCAB, seed=0).eval()


def cache_for(batch: int, dtype=torch.float32) -> KVCache:
    return KVCache(CFG.n_layer, batch, CFG.n_head, CFG.head_dim, CFG.block_size, torch.device("cpu"), dtype)


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_without_a_process_group_the_model_has_the_training_names_and_plain_layers(model):
    assert isinstance(model.blocks[0].attn.qkv, LocalLinear)
    names = dict(model.named_parameters())
    assert names["blocks.0.attn.qkv.weight"].shape == (3 * 32, 32)
    assert names["blocks.1.mlp.proj.weight"].shape == (32, 128)
    assert names["embedding.tokens.weight"].shape == (128, 32)  # 100 padded to a multiple of 64
    assert "head.ln_f.weight" in names and len(names) == 4 + 2 * 12  # no copy of the tied output layer
    # The split dimension megatron would use is recorded, so checkpoints written from this model carry it.
    assert names["blocks.0.attn.proj.weight"].partition_dim == 1
    assert names["blocks.0.mlp.fc.bias"].partition_dim == 0


@torch.no_grad()
def test_prefill_then_one_token_at_a_time_equals_recomputation(model):
    ids = tokens(3, 20)
    full = model(ids)[..., :VOCAB]
    cache = cache_for(3)
    steps = [model(ids[:, :7], cache=cache)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1)[..., :VOCAB], full, rtol=0, atol=1e-5)
    assert cache.length == 20 and cache.next_position.tolist() == [20, 20, 20]


@torch.no_grad()
def test_a_left_padded_prompt_decodes_as_it_would_alone(model):
    short, long = tokens(1, 6, seed=1), tokens(1, 10, seed=2)
    cache = cache_for(2)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    real = torch.ones(2, 10, dtype=torch.bool)
    real[0, :4] = False
    cache.mark_padding(real)
    first = model(batch, cache=cache)[:, -1, :VOCAB]
    following = tokens(2, 1, seed=3)
    second = model(following, cache=cache)[:, -1, :VOCAB]
    alone = model(torch.cat([short, following[:1]], 1))[0, -2:, :VOCAB]
    torch.testing.assert_close(torch.stack([first[0], second[0]]), alone, rtol=0, atol=1e-5)
    assert cache.next_position.tolist() == [7, 11]  # positions count real tokens only


@torch.no_grad()
def test_selecting_rows_reorders_and_repeats_the_cache(model):
    ids = tokens(2, 8, seed=4)
    cache = cache_for(2)
    model(ids, cache=cache)
    cache.select(torch.tensor([1, 1, 0]))
    nxt = tokens(3, 1, seed=5)
    got = model(nxt, cache=cache)[:, -1, :VOCAB]
    rows = ids[[1, 1, 0]]
    expected = model(torch.cat([rows, nxt], 1))[:, -1, :VOCAB]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_full_cache_refuses_more_tokens(model):
    cache = cache_for(1)
    with torch.no_grad():
        model(tokens(1, 30), cache=cache)
        with pytest.raises(ValueError, match="the cache holds 32 positions; 30 are filled, 3 more do not fit"):
            model(tokens(1, 3), cache=cache)


@torch.no_grad()
def test_bf16_decoding_follows_fp32(model):
    """The dtype path CUDA uses by default (bf16 weights, activations and cache), checked here on the CPU."""
    low = GPT(CFG, KernelsConfig(attention="torch_sdpa", layernorm="torch"), VOCAB, seed=0).eval()
    low.load_state_dict(model.state_dict())
    low = low.to(torch.bfloat16)
    ids = tokens(2, 12, seed=6)
    cache = cache_for(2, torch.bfloat16)
    out = torch.cat([low(ids[:, :6], cache=cache)] + [low(ids[:, t:t + 1], cache=cache) for t in range(6, 12)], 1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[..., :VOCAB].float(), model(ids)[..., :VOCAB], rtol=0, atol=0.05)
