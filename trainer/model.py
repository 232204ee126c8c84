"""The GPT: token + position embeddings, pre-LayerNorm blocks (causal self-attention, GELU MLP), tied head.

Built from megatron-core's tensor-parallel layers, so the same model runs at tp=1 and tp=8: the layout
decides how wide each rank's shard is, never which code runs. The model is a flat sequence of layers
(embedding, blocks, head) so the pipeline engine can cut it into stages.

Packed fine-tuning batches hold several samples per row: the model then takes `(ids, segment_ids, positions)`
instead of `ids`, keeps attention inside each sample, and the loss takes `(targets, weights)` (see
`language_model_loss`). Through the pipeline the segment ids travel with the activations, `(h, segment_ids)`.

Outside training (conversion, generation, evaluation) there is no process group: megatron-core's layers
need one even at tp=1, so the model is then built from plain torch layers with the same parameter names,
shapes and initial values (`Local*` below). Decoding passes a `KVCache` through `forward` (trainer/kv_cache.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

from kernels import causal_attention, layer_norm
from trainer.config import KernelsConfig, ModelConfig
from trainer.kv_cache import KVCache
from trainer.vocab import padded_vocab_size


def _normal_init(std: float) -> Callable[[torch.Tensor], None]:
    def init(tensor: torch.Tensor) -> None:
        nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def tensor_parallel_active() -> bool:
    """Whether megatron-core's parallel_state is up (training); if not, the model is built from `Local*` layers."""
    return parallel_state.model_parallel_is_initialized()


def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size() if tensor_parallel_active() else 1


def mark_split(param: nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


class LocalLinear(nn.Module):
    """`nn.Linear` under megatron-core's parameter names, initial values and return convention (output, None):
    the tp=1 layer of a model built with no process group."""

    def __init__(self, in_features: int, out_features: int, init_method: Callable[[torch.Tensor], None],
                 bias: bool, split_dim: int):
        super().__init__()
        # Megatron initialises an (out, in) master weight with init_method and biases with zeros.
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        init_method(self.weight.data)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # The dimension megatron's layer splits over tp (0: outputs, 1: inputs), marked as megatron marks it,
        # so that checkpoints written from this model record it too.
        mark_split(self.weight, split_dim)
        if self.bias is not None and split_dim == 0:
            mark_split(self.bias, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight, self.bias), None


class LocalEmbedding(nn.Module):
    """The whole token table of a model built with no process group (megatron's VocabParallelEmbedding at tp=1)."""

    def __init__(self, num_embeddings: int, width: int, init_method: Callable[[torch.Tensor], None]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, width))
        init_method(self.weight.data)
        mark_split(self.weight, 0)
        self.vocab_start_index = 0
        self.num_embeddings_per_partition = num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def column_linear(in_features: int, out_features: int, init_method, bias: bool, mp: ModelParallelConfig | None):
    """A linear layer whose outputs are split over tp (megatron's), or the plain one without a process group."""
    if mp is None:
        return LocalLinear(in_features, out_features, init_method, bias, split_dim=0)
    return tensor_parallel.ColumnParallelLinear(in_features, out_features, config=mp, init_method=init_method,
                                                bias=bias, gather_output=False)


def row_linear(in_features: int, out_features: int, init_method, bias: bool, mp: ModelParallelConfig | None):
    """A linear layer whose inputs are split over tp (megatron's), or the plain one without a process group."""
    if mp is None:
        return LocalLinear(in_features, out_features, init_method, bias, split_dim=1)
    return tensor_parallel.RowParallelLinear(in_features, out_features, config=mp, init_method=init_method,
                                             bias=bias, input_is_parallel=True, skip_bias_add=False)


def adapted(layer: nn.Module, adapter: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's output, plus its LoRA adapter's when fine-tuning gave it one (trainer/lora.py)."""
    out, _ = layer(x)
    return out if adapter is None else out + adapter(x)


def _parallel_config(sequence_parallel: bool = False) -> ModelParallelConfig | None:
    """Megatron's layer config for this layout; None when there is no process group (plain layers)."""
    if not tensor_parallel_active():
        return None
    return _megatron_config(sequence_parallel)


def _megatron_config(sequence_parallel: bool) -> ModelParallelConfig:
    # Weights are initialised on the CPU as one master tensor and then sliced, so every layout
    # starts from identical numbers; fused CUDA-only paths stay off so CPU and GPU share code.
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        sequence_parallel=sequence_parallel,
        params_dtype=torch.float32,
    )


# Sequence parallelism (Megatron's): between the tensor-parallel regions, each tp rank holds its own chunk
# of the sequence, (B, T/tp, C), so LayerNorm, dropout and the residual stream cost 1/tp of the memory.
# Megatron's sequence-parallel layers gather and scatter along dim 0; these helpers move our batch-first
# activations in and out of that order. With sequence_parallel off they are not called (or are identities).


def scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C), the same on every tp rank -> this rank's (B, T/tp, C); the backward all-gathers."""
    return tensor_parallel.scatter_to_sequence_parallel_region(x.transpose(0, 1)).transpose(0, 1).contiguous()


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    """This rank's (B, T/tp, C) -> the whole (B, T, C); the backward reduce-scatters the gradient."""
    gathered = tensor_parallel.gather_from_sequence_parallel_region(
        x.transpose(0, 1).contiguous(), tensor_parallel_output_grad=True)
    return gathered.transpose(0, 1)


def _chunks_to_sequence(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """(chunks*B, T/chunks, ...) as a sequence-parallel column layer gathers it -> (B, T, ...)."""
    batch = t.shape[0] // chunks
    return t.view(chunks, batch, *t.shape[1:]).transpose(0, 1).reshape(batch, chunks * t.shape[1], *t.shape[2:])


def _sequence_to_chunks(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """(B, T, ...) -> (chunks*B, T/chunks, ...), the order a sequence-parallel row layer reduce-scatters."""
    batch, seq_len = t.shape[:2]
    rest = t.shape[2:]
    return t.view(batch, chunks, seq_len // chunks, *rest).transpose(0, 1).reshape(chunks * batch, -1, *rest)


def _sum_over_tensor_parallel(grad: torch.Tensor) -> torch.Tensor:
    """A replicated parameter used on sequence chunks gets a partial gradient on each tp rank: sum them."""
    torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad


def mark_sequence_parallel(module: nn.Module) -> None:
    """Sum the gradients of `module`'s replicated parameters over tp (Megatron marks them `sequence_parallel`)."""
    for param in module.parameters(recurse=False):
        if not getattr(param, "tensor_model_parallel", False):
            param.sequence_parallel = True
            param.register_hook(_sum_over_tensor_parallel)


class LayerNorm(nn.Module):
    """LayerNorm whose arithmetic is chosen by `kernels.layernorm` (replicated across tp ranks)."""

    def __init__(self, width: int, eps: float, impl: str, sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps
        self.impl = impl
        if sequence_parallel:
            mark_sequence_parallel(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, self.impl)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; heads are split over tensor-parallel ranks."""

    def __init__(self, cfg: ModelConfig, kernels: KernelsConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = mp.tensor_model_parallel_size if mp else 1
        # Sequence chunks the input arrives in: tp with sequence parallelism (the qkv layer gathers them).
        self.sequence_chunks = tp if mp and mp.sequence_parallel else 1
        self.local_heads = cfg.n_head // tp
        self.head_dim = cfg.head_dim
        self.attention_impl = kernels.attention
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)  # GPT-2: scale residual writes by depth
        # Output rows are laid out head by head as (head, q|k|v, head_dim), so a contiguous tp slice
        # holds whole heads with their q, k and v together.
        self.qkv = column_linear(cfg.n_embd, 3 * cfg.n_embd, _normal_init(cfg.init_std), cfg.bias, mp)
        self.proj = row_linear(cfg.n_embd, cfg.n_embd, _normal_init(residual_std), cfg.bias, mp)
        self.qkv_lora = self.proj_lora = None  # LoRA adapters, when fine-tuning adds them

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        qkv = adapted(self.qkv, self.qkv_lora, x)  # (B, T, local_heads * 3 * hd); with sequence parallelism every rank's chunk
        qkv = _chunks_to_sequence(qkv, self.sequence_chunks)
        batch, seq_len, _ = qkv.shape
        qkv = qkv.view(batch, seq_len, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, nh_local, T, hd)
        if cache is None:
            y = causal_attention(q, k, v, self.attention_impl, segment_ids=segment_ids)
        else:  # decoding: this call's tokens attend to the cached ones and to each other
            y = cache.attend(layer, q, k, v)
        y = y.transpose(1, 2).reshape(batch, seq_len, self.local_heads * self.head_dim)
        return adapted(self.proj, self.proj_lora, _sequence_to_chunks(y, self.sequence_chunks))  # this rank's chunk


class MLP(nn.Module):
    """Linear -> GELU -> Linear; the hidden width is split over tensor-parallel ranks."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        self.fc = column_linear(cfg.n_embd, cfg.ffn_size, _normal_init(cfg.init_std), cfg.bias, mp)
        self.proj = row_linear(cfg.ffn_size, cfg.n_embd, _normal_init(residual_std), cfg.bias, mp)
        self.fc_lora = self.proj_lora = None  # LoRA adapters, when fine-tuning adds them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = adapted(self.fc, self.fc_lora, x)
        return adapted(self.proj, self.proj_lora, F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig, kernels: KernelsConfig, seed: int, layer_index: int,
                 sequence_parallel: bool = False):
        super().__init__()
        mp = _parallel_config(sequence_parallel)
        self.layer_index = layer_index
        with _seeded(seed, layer_index + 1):
            self.ln_attn = LayerNorm(cfg.n_embd, cfg.layernorm_eps, kernels.layernorm, sequence_parallel)
            self.attn = CausalSelfAttention(cfg, kernels, mp)
            self.ln_mlp = LayerNorm(cfg.n_embd, cfg.layernorm_eps, kernels.layernorm, sequence_parallel)
            self.mlp = MLP(cfg, mp)
        if sequence_parallel:  # the row layers' biases are added to sequence chunks, after the reduce-scatter
            mark_sequence_parallel(self.attn.proj)
            mark_sequence_parallel(self.mlp.proj)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None):
        """`x` is the residual stream (B, T, C), or `(h, segment_ids)` for packed samples (returned alike)."""
        if isinstance(x, tuple):
            h, segment_ids = x
            return self._residual(h, cache, segment_ids), segment_ids
        return self._residual(x, cache, None)

    def _residual(self, x: torch.Tensor, cache: KVCache | None, segment_ids: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_attn(x), cache, self.layer_index, segment_ids))
        return x + self.dropout(self.mlp(self.ln_mlp(x)))


class Embedding(nn.Module):
    """Token embedding (vocab split over tp ranks) plus learned positions; also the tied output layer.

    `forward(idx)` embeds; `forward(h, output_layer=True)` returns this rank's slice of the vocabulary
    logits, (B, T, V/tp). Both go through the module call, so ZeRO-3 gathers the shared table either way.
    With sequence parallelism the embedding returns this rank's sequence chunk, and the output layer
    gathers the chunks back.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, seed: int, sequence_parallel: bool = False):
        super().__init__()
        self.tokens = _token_table(cfg, vocab_size, seed)
        with _seeded(seed, 0):
            self.positions = nn.Embedding(cfg.block_size, cfg.n_embd)
            nn.init.normal_(self.positions.weight, mean=0.0, std=cfg.init_std)
        self.dropout = nn.Dropout(cfg.dropout)
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor | tuple, output_layer: bool = False, positions: torch.Tensor | None = None):
        """`positions` (B, T) default to 0..T-1; decoding passes each token's own (after the cached ones).

        Packed samples come as `(ids, segment_ids, positions)` and leave as `(h, segment_ids)`."""
        if output_layer:
            return _tied_logits(x, self.tokens, self.sequence_parallel)
        if isinstance(x, tuple):
            ids, segment_ids, positions = x
            return self.forward(ids, positions=positions), segment_ids
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        h = self.dropout(self.tokens(x) + self.positions(positions))  # (B, T, C)
        return scatter_sequence(h) if self.sequence_parallel else h


class OutputLayer(nn.Module):
    """The last pipeline stage's copy of the token table, used as the output projection.

    Built from the same seed as `Embedding.tokens`, and kept equal to it by the pipeline engine, which
    ties the two `tokens.weight` tensors and sums their gradients.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, seed: int, sequence_parallel: bool = False):
        super().__init__()
        self.tokens = _token_table(cfg, vocab_size, seed)
        self.sequence_parallel = sequence_parallel

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _tied_logits(h, self.tokens, self.sequence_parallel)


def _token_table(cfg: ModelConfig, vocab_size: int, seed: int) -> nn.Module:
    """The vocab-parallel token table, padded; rows past `vocab_size` are padding."""
    padded = padded_vocab_size(vocab_size, cfg.pad_vocab_to_multiple, _tp_size())
    mp = _parallel_config()
    with _seeded(seed, 0):  # drawn first under seed 0, so the embedding and output copies agree
        if mp is None:
            table = LocalEmbedding(padded, cfg.n_embd, _normal_init(cfg.init_std))
        else:
            table = tensor_parallel.VocabParallelEmbedding(padded, cfg.n_embd, init_method=_normal_init(cfg.init_std),
                                                           config=mp)
    # Logits of padding rows are masked, so the padding (which depends on tp) never changes the model.
    local_start = table.vocab_start_index
    local_ids = torch.arange(local_start, local_start + table.num_embeddings_per_partition)
    table.register_buffer("padding_mask", local_ids >= vocab_size, persistent=False)
    return table


def _tied_logits(h: torch.Tensor, table: nn.Module, sequence_parallel: bool = False) -> torch.Tensor:
    """This rank's slice of the vocabulary logits, (B, T, V/tp): h @ table^T.

    h's gradient is summed over tp (all-reduced, or reduce-scattered back to sequence chunks).
    """
    if sequence_parallel:
        h = gather_sequence(h)
    elif not isinstance(table, LocalEmbedding):
        h = tensor_parallel.copy_to_tensor_model_parallel_region(h)
    logits = F.linear(h, table.weight)
    return logits.masked_fill(table.padding_mask, float("-inf"))


class FinalNorm(nn.Module):
    """The LayerNorm after the last block."""

    def __init__(self, cfg: ModelConfig, kernels: KernelsConfig, sequence_parallel: bool = False):
        super().__init__()
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layernorm_eps, kernels.layernorm, sequence_parallel)

    def forward(self, h: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(h, tuple):  # packed samples: the segment ids are no longer needed
            h = h[0]
        return self.ln_f(h)


def language_model_loss(vocab_parallel_logits: torch.Tensor,
                        labels: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross entropy over vocab-parallel logits, computed in fp32.

    `labels` is the targets (B, T): the mean over every token (pretraining). Or `(targets, weights)`: the sum of
    each token's loss times its weight, where the engine has made the weights the loss mask divided by the
    valid tokens of the whole global batch (times the micro-batches and dp replicas DeepSpeed averages over),
    so that masked tokens do not count and every valid token weighs the same whatever the layout.
    """
    targets, weights = labels if isinstance(labels, tuple) else (labels, None)
    logits = vocab_parallel_logits.float()
    if not tensor_parallel_active():  # a model built with no process group holds the whole vocabulary
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    else:
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits, targets)
    if weights is None:
        return losses.mean()
    return (losses * weights).sum()


class GPT(nn.Module):
    """The decoder-only language model; `forward(idx, targets)` returns the loss, or logits without targets.

    The layers are the ones `build_pipeline` hands to DeepSpeed's PipelineModule, in the same order:
    embedding, blocks, final norm, tied output layer (here the embedding's own table). Each layer seeds its own initialisation, so it
    starts identical whatever pipeline stage or tensor-parallel rank builds it.
    """

    def __init__(self, cfg: ModelConfig, kernels: KernelsConfig, vocab_size: int, seed: int,
                 activation_checkpointing: bool = False, sequence_parallel: bool = False):
        super().__init__()
        self.config = cfg
        self.vocab_size = padded_vocab_size(vocab_size, cfg.pad_vocab_to_multiple, _tp_size())
        self.activation_checkpointing = activation_checkpointing
        self.embedding = Embedding(cfg, vocab_size, seed, sequence_parallel)
        self.blocks = nn.ModuleList(Block(cfg, kernels, seed, i, sequence_parallel) for i in range(cfg.n_layer))
        self.head = FinalNorm(cfg, kernels, sequence_parallel)

    def forward(self, idx: torch.Tensor | tuple, targets: torch.Tensor | tuple | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """The loss, or the logits (B, T, V/tp). `idx` and `targets` may be packed samples' tuples (see
        `Embedding.forward` and `language_model_loss`). With a `cache`, `idx` continues the cached tokens: their
        keys and values are reused, this call's are added, and positions continue from where the cache stands."""
        if isinstance(idx, tuple):
            h = self.embedding(idx)
        else:
            h = self.embedding(idx, positions=None if cache is None else cache.positions(idx.shape[1]))
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                h = checkpoint_block(block, h)
            else:
                h = block(h, cache)
        if cache is not None:
            cache.advance(idx.shape[1])
        logits = self.embedding(self.head(h), output_layer=True)
        if targets is None:
            return logits
        return language_model_loss(logits, targets)

    def num_parameters(self) -> int:
        """Parameters held by this rank (the tied output layer counted once)."""
        return sum(p.numel() for p in self.parameters())


def checkpoint_block(block, *inputs):
    """Run a block without keeping its activations; the backward pass recomputes them (RNG replayed).

    `inputs` is the residual stream, or its tuple with the segment ids of packed samples (as the pipeline
    engine passes them, unpacked)."""
    return torch.utils.checkpoint.checkpoint(block, inputs[0] if len(inputs) == 1 else inputs, use_reentrant=False)


@contextmanager
def _seeded(seed: int, index: int) -> Iterator[None]:
    """Run a block with the CPU generator seeded from (seed, index), restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + index)
        yield
