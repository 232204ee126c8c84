"""The FLOP formula: worked by hand for a one-layer model, and measured on a real forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import KernelsConfig, ModelConfig
from trainer.cost.flops import (
    flops_per_step,
    forward_flops_per_token,
    hardware_flops_per_token,
    model_flops_per_token,
    six_n_flops_per_token,
)
from trainer.cost.params import parameter_count
from trainer.model import GPT


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
def test_formula_matches_flop_counter_on_a_real_gpt(cpu_topology, seq_len):
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


def test_recompute_adds_one_forward_of_the_blocks_by_hand():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=4, ffn_hidden_size=16, block_size=8)
    # Same model as above: blocks' forward 384 + 64 = 448 per token, output layer 80, model FLOPs 3*528 = 1584.
    # Full recompute reruns the block's forward (not the output layer): 1584 + 448 = 2032.
    assert hardware_flops_per_token(cfg, vocab_size=10, seq_len=8, recompute=False) == 1584
    assert hardware_flops_per_token(cfg, vocab_size=10, seq_len=8, recompute=True) == 2032
    # 6N: a 540-parameter model does 6*540 = 3240 FLOPs per token; a step of 4 sequences of 8 tokens, 32x that.
    assert six_n_flops_per_token(540) == 3240
    assert flops_per_step(1584, global_batch=4, seq_len=8) == 1584 * 32


def test_recompute_formula_matches_flop_counter(cpu_topology):
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=32)
    seq_len, batch = 32, 2
    model = GPT(cfg, KernelsConfig(attention="reference"), vocab_size=100, seed=0, activation_checkpointing=True)
    idx = torch.randint(0, 100, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(idx).float().pow(2).mean().backward()
    # The recomputed forward of the reference attention also spends the masked half: 4 passes in all.
    expected = batch * seq_len * (
        hardware_flops_per_token(cfg, model.vocab_size, seq_len, recompute=True) + 4 * _masked_half(cfg, seq_len)
    )
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)


def test_six_n_is_close_to_the_exact_count_for_gpt3_175b():
    cfg = ModelConfig(n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257,
                      pad_vocab_to_multiple=128)
    n = parameter_count(cfg, 50257).total
    exact = model_flops_per_token(cfg, 50304, 2048)
    # The attention term (6*L*d*T, ~1.4% here) and the output layer make up nearly all the difference.
    assert exact / six_n_flops_per_token(n) == pytest.approx(1.0, abs=0.03)
    assert 3.1e23 < 300e9 * six_n_flops_per_token(n) < 3.2e23  # GPT-3's 3.14e23 FLOPs
