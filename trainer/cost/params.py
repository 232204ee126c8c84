"""Parameter count of our GPT, exactly, from the config (learned positions, biases, tied head counted once).

With d = n_embd, f = the MLP width, L = n_layer, P = block_size, V = the vocabulary padded to
`pad_vocab_to_multiple * tp`:

    total = V*d + P*d + L * per_layer + 2*d
    per_layer = (3*d*d + 3*d) + (d*d + d) + (d*f + f) + (f*d + d) + 2 * 2*d

(qkv, out projection, MLP fc, MLP projection, each weight + bias; two LayerNorms of weight + bias;
`model.bias=false` drops the four linear biases but not the LayerNorms'). The final LayerNorm is 2*d; the
output layer is the token table itself, counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ModelConfig
from trainer.vocab import padded_vocab_size


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by part; `per_layer` is one transformer block."""

    token_embedding: int
    position_embedding: int
    per_layer: int
    n_layer: int
    final_norm: int

    @property
    def blocks(self) -> int:
        return self.per_layer * self.n_layer

    @property
    def total(self) -> int:
        return self.token_embedding + self.position_embedding + self.blocks + self.final_norm

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: everything but the token and position tables."""
        return self.blocks + self.final_norm


def layer_parameters(model: ModelConfig) -> int:
    """One block's parameters: qkv, out projection, fc, MLP projection (weights + biases) and two LayerNorms."""
    d, ffn = model.n_embd, model.ffn_size
    weights = 3 * d * d + d * d + d * ffn + ffn * d
    biases = (3 * d + d + ffn + d) if model.bias else 0
    return weights + biases + 2 * 2 * d


def parameter_count(model: ModelConfig, vocab_size: int, tp: int = 1) -> ParameterCount:
    """The whole model's parameters; `vocab_size` is the tokenizer's, padded here as the model pads it at `tp`."""
    d = model.n_embd
    return ParameterCount(
        token_embedding=padded_vocab_size(vocab_size, model.pad_vocab_to_multiple, tp) * d,
        position_embedding=model.block_size * d,
        per_layer=layer_parameters(model),
        n_layer=model.n_layer,
        final_norm=2 * d,
    )


def layer_parameters_per_rank(model: ModelConfig, tp: int) -> int:
    """One block's parameters on one tensor-parallel rank.

    Column-parallel qkv and fc split their weights and biases over tp; row-parallel projections split their
    weights but keep the whole bias on every rank; LayerNorms are replicated.
    """
    d, ffn = model.n_embd, model.ffn_size
    split = (3 * d * d + d * d + d * ffn + ffn * d) // tp
    if model.bias:
        split += (3 * d + ffn) // tp
    replicated = (2 * d if model.bias else 0) + 2 * 2 * d
    return split + replicated


def adapter_parameters_per_rank(model: ModelConfig, tp: int, rank: int, targets: tuple[str, ...]) -> int:
    """One block's LoRA adapter parameters on one tensor-parallel rank (trainer/lora.py).

    An adapter of a column-parallel layer (qkv, fc) keeps A (r, in) whole and splits B (out, r) over tp; one of a
    row-parallel layer (attention and MLP projections) splits A (r, in) and keeps B (out, r) whole.
    """
    d, ffn = model.n_embd, model.ffn_size
    per_target = {
        "qkv": rank * d + 3 * d * rank // tp,
        "attn_proj": rank * d // tp + d * rank,
        "fc": rank * d + ffn * rank // tp,
        "mlp_proj": rank * ffn // tp + d * rank,
    }
    return sum(per_target[target] for target in targets)
