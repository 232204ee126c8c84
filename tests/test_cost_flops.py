"""The FLOP formula: by hand, equal term by term to what FlopCounterMode counts on a real GPT, and 6N."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import KernelsConfig, ModelConfig
from trainer.cost.flops import (
    attention_flops_per_token,
    dense_flops_per_token,
    flops_per_step,
    forward_flops_per_token,
    hardware_flops_per_token,
    model_flops_per_token,
    output_layer_flops_per_token,
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


# Configurations the counter checks: the default MLP and biases, an odd MLP width with an odd vocabulary, no
# linear biases; vocabularies 100 and 129 are padded (to 128 and 192), 512 is not.
COUNTED_MODELS = [
    pytest.param(dict(n_layer=2, n_head=4, n_embd=32, block_size=32), 100, 16, id="d32-T16"),
    pytest.param(dict(n_layer=2, n_head=4, n_embd=32, block_size=32), 100, 32, id="d32-T32"),
    pytest.param(dict(n_layer=1, n_head=2, n_embd=16, block_size=8, ffn_hidden_size=40), 129, 8, id="ffn40"),
    pytest.param(dict(n_layer=3, n_head=4, n_embd=64, block_size=64, bias=False), 512, 48, id="no-bias"),
]


def _counted_flops(model: GPT, idx: torch.Tensor, backward: bool) -> dict[str, int]:
    """What FlopCounterMode counts for a forward (and backward) of `model`, by aten op."""
    with FlopCounterMode(display=False) as counter:
        out = model(idx)
        if backward:
            out.float().pow(2).mean().backward()
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


def _counted_terms(cfg: ModelConfig, padded_vocab: int, tokens: int, seq_len: int) -> tuple[float, float]:
    """The formula's (weight matmuls incl. the output layer, causal attention) FLOPs of one forward of `tokens`."""
    matmuls = tokens * (cfg.n_layer * dense_flops_per_token(cfg) + output_layer_flops_per_token(cfg, padded_vocab))
    return matmuls, tokens * cfg.n_layer * attention_flops_per_token(cfg, seq_len)


# Scope, term by term. FlopCounterMode counts matmuls only, 2 FLOPs per multiply-add, as the formula does:
# - aten.mm: every linear layer (megatron's layers add their bias outside the matmul, so biases are not in it)
#   and the output layer over the padded vocabulary, which the model computes in full (padding rows are
#   masked after the matmul). The formula's dense and output-layer terms, exactly.
# - aten.bmm: the reference attention's QK^T and PV over the whole T x T matrix. The formula credits the
#   causal half (what a flash kernel computes and MFU counts), so the counter sees exactly twice its term.
#   (torch_sdpa on a CPU runs an op FlopCounterMode has no formula for and would count no attention at all:
#   hence the reference attention here.)
# - Not counted by either: embedding lookups, LayerNorm, GELU, softmax, bias adds, the loss.
# Backward runs two matmuls (input and weight gradients; for bmm both operands' gradients) per forward matmul.
@pytest.mark.parametrize(("fields", "vocab", "seq_len"), COUNTED_MODELS)
def test_formula_equals_flop_counter_term_by_term(cpu_topology, fields, vocab, seq_len):
    cfg = ModelConfig(**fields)
    model = GPT(cfg, KernelsConfig(attention="reference"), vocab_size=vocab, seed=0)
    batch = 2
    idx = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    matmuls, attention = _counted_terms(cfg, model.vocab_size, batch * seq_len, seq_len)

    forward = _counted_flops(model, idx, backward=False)
    assert forward == {"aten.mm": matmuls, "aten.bmm": 2 * attention}
    forward_flops = batch * seq_len * forward_flops_per_token(cfg, model.vocab_size, seq_len)
    assert sum(forward.values()) == forward_flops + attention

    training = _counted_flops(model, idx, backward=True)
    assert training == {"aten.mm": 3 * matmuls, "aten.bmm": 3 * 2 * attention}
    model_flops = batch * seq_len * model_flops_per_token(cfg, model.vocab_size, seq_len)
    assert sum(training.values()) == model_flops + 3 * attention


def test_recompute_adds_one_forward_of_the_blocks_by_hand():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=4, ffn_hidden_size=16, block_size=8)
    # Same model as above: blocks' forward 384 + 64 = 448 per token, output layer 80, model FLOPs 3*528 = 1584.
    # Full recompute reruns the block's forward (not the output layer): 1584 + 448 = 2032.
    assert hardware_flops_per_token(cfg, vocab_size=10, seq_len=8, recompute=False) == 1584
    assert hardware_flops_per_token(cfg, vocab_size=10, seq_len=8, recompute=True) == 2032
    # 6N: a 540-parameter model does 6*540 = 3240 FLOPs per token; a step of 4 sequences of 8 tokens, 32x that.
    assert six_n_flops_per_token(540) == 3240
    assert flops_per_step(1584, global_batch=4, seq_len=8) == 1584 * 32


def test_recompute_formula_equals_flop_counter(cpu_topology):
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=32)
    seq_len, batch = 32, 2
    model = GPT(cfg, KernelsConfig(attention="reference"), vocab_size=100, seed=0, activation_checkpointing=True)
    idx = torch.randint(0, 100, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    matmuls, attention = _counted_terms(cfg, model.vocab_size, batch * seq_len, seq_len)
    blocks_dense = batch * seq_len * cfg.n_layer * dense_flops_per_token(cfg)

    counted = _counted_flops(model, idx, backward=True)
    # The blocks' forward runs twice (once more in the backward pass), the output layer once: the blocks'
    # dense matmuls and all of attention (whole T x T in the reference, twice the formula's term) once more.
    assert counted == {"aten.mm": 3 * matmuls + blocks_dense, "aten.bmm": 4 * 2 * attention}
    hardware_flops = batch * seq_len * hardware_flops_per_token(cfg, model.vocab_size, seq_len, recompute=True)
    assert sum(counted.values()) == hardware_flops + 4 * attention


def test_six_n_differs_from_the_exact_count_by_attention_and_the_tables_for_gpt3_175b():
    cfg = ModelConfig(n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257,
                      pad_vocab_to_multiple=128)
    d, layers, seq_len, positions = 12288, 96, 2048, 2048
    six_n = six_n_flops_per_token(parameter_count(cfg, 50257).total)
    exact = model_flops_per_token(cfg, 50304, seq_len)
    # exact = 3 * (L*(24d^2 + 2dT) + 2dV); 6N = 6 * (L*(12d^2 + 13d) + Vd + Pd + 2d) with f = 4d. The d^2 and
    # the tied V*d terms cancel, leaving attention's 6LdT less 6N's biases, LayerNorms and position table.
    assert exact - six_n == 6 * d * (layers * (seq_len - 13) - positions - 2)  # 14,252,359,680 FLOPs
    # So 6N undercounts by a little less than attention's share, 6LdT / 6*12Ld^2 = T/(12d) = 1.39% here.
    assert 0 < exact / six_n - 1 < seq_len / (12 * d)
    # GPT-3's paper rounds its 6ND to 3.14e23 FLOPs (so to within 0.5e21, 1.6e-3).
    assert 300e9 * six_n == pytest.approx(3.14e23, rel=1.6e-3)
