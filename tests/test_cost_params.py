"""The parameter count from the config: worked by hand, and equal to the built model's."""

from __future__ import annotations

import pytest

from trainer.config import KernelsConfig, ModelConfig
from trainer.cost.params import layer_parameters_per_rank, parameter_count
from trainer.model import GPT


def test_one_layer_count_by_hand():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=4, ffn_hidden_size=16, block_size=8)
    # d=4, f=16, vocab 10 padded to 64 (pad_vocab_to_multiple at tp=1).
    tokens = 64 * 4  # 256
    positions = 8 * 4  # 32
    weights = 4 * 12 + 4 * 4 + 4 * 16 + 16 * 4  # qkv 48, proj 16, fc 64, mlp proj 64 = 192
    biases = 12 + 4 + 16 + 4  # 36
    norms = 2 * (4 + 4)  # two LayerNorms, weight + bias: 16
    final_norm = 8
    assert tokens + positions + weights + biases + norms + final_norm == 540
    count = parameter_count(cfg, vocab_size=10)
    assert (count.token_embedding, count.position_embedding, count.per_layer, count.final_norm) == (256, 32, 244, 8)
    assert count.total == 540 and count.non_embedding == 252
    # At tp=2 qkv and fc (weights and biases) split; the projections' biases and the LayerNorms do not:
    # (192 + 12 + 16) / 2 + 4 + 4 + 16 = 110 + 24 = 134.
    assert layer_parameters_per_rank(cfg, tp=2) == 134
    # Without linear biases only the LayerNorms keep theirs: 192 + 16 = 208.
    assert parameter_count(ModelConfig(n_layer=1, n_head=2, n_embd=4, ffn_hidden_size=16, block_size=8,
                                       bias=False), 10).per_layer == 208


@pytest.mark.parametrize(
    ("fields", "vocab"),
    [
        (dict(n_layer=2, n_head=4, n_embd=32, block_size=32), 100),
        (dict(n_layer=1, n_head=2, n_embd=16, block_size=8, ffn_hidden_size=40), 129),
        (dict(n_layer=3, n_head=4, n_embd=64, block_size=64, bias=False), 512),
        (dict(n_layer=2, n_head=2, n_embd=48, block_size=16, pad_vocab_to_multiple=128), 300),
    ],
)
def test_count_equals_the_models(cpu_topology, fields, vocab):
    cfg = ModelConfig(**fields)
    model = GPT(cfg, KernelsConfig(), vocab, seed=0)
    assert parameter_count(cfg, vocab).total == model.num_parameters()
