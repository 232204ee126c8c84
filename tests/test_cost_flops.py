"""The FLOP formula: worked by hand for a one-layer model, and measured on a real forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import KernelsConfig, ModelConfig, ParallelConfig
from trainer.cost.flops import forward_flops_per_token, model_flops_per_token
from trainer.model import GPT
from trainer.parallel.topology import init_topology, shutdown_topology


@pytest.fixture(scope="module")
def topology():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; a second spinning thread only hurts on a loaded machine
    yield init_topology(ParallelConfig(), "cpu")
    shutdown_topology()
    torch.set_num_threads(threads)


def test_one_layer_forward_flops_by_hand():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=4, ffn_hidden_size=16, block_size=8)
    d, ffn, seq_len, vocab = 4, 16, 8, 10
    # Per token, a (1 x m) @ (m x n) matmul is m*n multiply-adds = 2*m*n FLOPs.
    qkv = 2 * d * (3 * d)  # 2*4*12 = 96
    out_proj = 2 * d * d  # 2*4*4 = 32
    mlp = 2 * d * ffn + 2 * ffn * d  # 128 + 128 = 256
    dense = qkv + out_proj + mlp  # 384
    # Scores q.k over seq_len keys (2*d*T = 64) and the weighted sum of seq_len values (another 64);
    # with the causal mask a token sees (T+1)/2 keys on average, counted as T/2: 128 / 2 = 64.
    attention = (2 * d * seq_len + 2 * d * seq_len) // 2  # 64
    output_layer = 2 * d * vocab  # 80
    assert dense + attention + output_layer == 528

    assert forward_flops_per_token(cfg, vocab_size=vocab, seq_len=seq_len) == 528
    assert model_flops_per_token(cfg, vocab_size=vocab, seq_len=seq_len) == 3 * 528
    # Layers add their dense and attention work; the output layer is counted once.
    two_layers = ModelConfig(n_layer=2, n_head=2, n_embd=4, ffn_hidden_size=16, block_size=8)
    assert forward_flops_per_token(two_layers, vocab_size=vocab, seq_len=seq_len) == 2 * (384 + 64) + 80


def _masked_half(cfg: ModelConfig, seq_len: int) -> float:
    """Attention FLOPs per token that a dense T x T matmul spends on masked-out (future) positions."""
    return cfg.n_layer * 2 * cfg.n_embd * seq_len


@pytest.mark.parametrize("seq_len", [16, 32])
def test_formula_matches_flop_counter_on_a_real_gpt(topology, seq_len):
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=32)
    # The reference attention runs QK^T and PV as plain matmuls over the full T x T matrix, so
    # FlopCounterMode counts the masked half as well; our formula counts only the causal half (what a
    # flash kernel does and what MFU should credit). Add the masked half back before comparing.
    # Embedding lookups, LayerNorm, GELU, softmax and bias adds are not matmuls; neither side counts them.
    model = GPT(cfg, KernelsConfig(attention="reference"), vocab_size=100, seed=0)
    batch = 2
    idx = torch.randint(0, 100, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    tokens = batch * seq_len

    with FlopCounterMode(display=False) as forward:
        logits = model(idx)
    expected = tokens * (forward_flops_per_token(cfg, model.vocab_size, seq_len) + _masked_half(cfg, seq_len))
    assert forward.get_total_flops() == pytest.approx(expected, rel=0.02)

    # Backward computes two matmuls (input and weight gradients) per forward matmul: 3x in all.
    with FlopCounterMode(display=False) as training:
        model(idx).float().pow(2).mean().backward()
    expected = tokens * (
        model_flops_per_token(cfg, model.vocab_size, seq_len) + 3 * _masked_half(cfg, seq_len)
    )
    assert training.get_total_flops() == pytest.approx(expected, rel=0.02)
    assert logits.shape == (batch, seq_len, model.vocab_size)
