"""FLOPs of our GPT, counted from its matmuls (a multiply-add is 2 FLOPs)."""

from __future__ import annotations

from trainer.config import ModelConfig


def forward_flops_per_token(model: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Forward-pass FLOPs per token: the dense layers, attention's T-dependent term and the output layer."""
    d, ffn = model.n_embd, model.ffn_size
    dense_per_layer = 2 * (3 * d * d + d * d + 2 * d * ffn)  # qkv, out projection, two MLP matmuls
    # QK^T and attention-weighted V; causal masking halves the useful work on average.
    attention_per_layer = 2 * 2 * d * seq_len / 2
    output_layer = 2 * d * vocab_size
    return model.n_layer * (dense_per_layer + attention_per_layer) + output_layer


def model_flops_per_token(model: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), without activation recomputation."""
    return 3 * forward_flops_per_token(model, vocab_size, seq_len)
