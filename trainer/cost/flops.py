"""FLOPs of our GPT, counted from its matmuls (a multiply-add is 2 FLOPs).

Per token, with d = n_embd, f = the MLP width, L = n_layer, T = seq_len, V = the (padded) vocabulary:

    forward = L * (2*(4*d*d + 2*d*f) + 2*d*T) + 2*d*V

The dense term is the qkv (d x 3d), out-projection (d x d) and two MLP (d x f, f x d) matmuls. The attention
term is QK^T and softmax(QK^T)V: 2*d*T FLOPs each over the full T x T matrix, halved because under the
causal mask a token attends to (T+1)/2 keys on average (counted as T/2: what a flash kernel computes and
what MFU should credit). The output layer is the tied h @ E^T. Embedding lookups, LayerNorm, GELU, softmax
and bias adds are not matmuls and are not counted (under 1% at any size worth planning).

Each term has its own function; tests/test_cost_flops.py checks them one by one, for equality, against what
torch's FlopCounterMode counts on the built model.
"""

from __future__ import annotations

from trainer.config import ModelConfig


def forward_flops_per_token(model: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Forward-pass FLOPs per token: the dense layers, attention's T-dependent term and the output layer."""
    return model.n_layer * _block_forward_flops(model, seq_len) + output_layer_flops_per_token(model, vocab_size)


def dense_flops_per_token(model: ModelConfig) -> float:
    """One block's weight matmuls per token: qkv (d x 3d), out projection (d x d), MLP fc and projection (d x f)."""
    d, ffn = model.n_embd, model.ffn_size
    return 2 * (3 * d * d + d * d + 2 * d * ffn)


def attention_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """One block's QK^T and attention-weighted V per token, 2*d*T each, halved: the causal mask's useful half."""
    return 2 * 2 * model.n_embd * seq_len / 2


def output_layer_flops_per_token(model: ModelConfig, vocab_size: int) -> float:
    """The tied output layer h @ E^T per token over the (padded) vocabulary."""
    return 2 * model.n_embd * vocab_size


def _block_forward_flops(model: ModelConfig, seq_len: int) -> float:
    return dense_flops_per_token(model) + attention_flops_per_token(model, seq_len)


def model_flops_per_token(model: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), without activation recomputation."""
    return 3 * forward_flops_per_token(model, vocab_size, seq_len)


def hardware_flops_per_token(model: ModelConfig, vocab_size: int, seq_len: int, recompute: bool) -> float:
    """FLOPs the GPUs execute per token: model FLOPs plus, under full recompute, one more forward of the blocks.

    hardware = 3 * forward + (L * block_forward if recompute): the trainer checkpoints each transformer block
    (`checkpoint_block`), so the backward pass reruns the blocks' forward but not the output layer; that is
    the "4x forward" of Korthikanti et al. (2022) minus the output layer. MFU credits model FLOPs only;
    HFU = hardware FLOPs / peak.
    """
    extra = model.n_layer * _block_forward_flops(model, seq_len) if recompute else 0.0
    return model_flops_per_token(model, vocab_size, seq_len) + extra


def six_n_flops_per_token(num_parameters: int) -> float:
    """The 6N convention (Kaplan et al. 2020): 2N forward + 4N backward, attention's T-term and lookups ignored."""
    return 6.0 * num_parameters


def flops_per_step(flops_per_token: float, global_batch: int, seq_len: int) -> float:
    """FLOPs of one optimizer step: per-token FLOPs x global batch (sequences) x seq_len tokens."""
    return flops_per_token * global_batch * seq_len
