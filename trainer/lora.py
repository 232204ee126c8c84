"""LoRA: low-rank adapters on the GPT's linear layers, split over tensor parallelism like the layers they adapt.

An adapted layer computes W x + (alpha / r) B A x with W frozen, A (r, in) drawn as `nn.Linear` draws its
weight (Kaiming-uniform) and B (out, r) zero, so at the start the model is exactly the base model (Hu et al.
2021, "LoRA"). Under tensor parallelism an adapter splits as its layer does:

- column-parallel layers (qkv, fc: outputs split): A is whole on every rank, B holds this rank's output rows;
  the gradient of the rank-r activation is summed over tp on its way back to A (all-reduced, or
  reduce-scattered to the sequence chunks with sequence parallelism, A's gradient then summed over tp).
- row-parallel layers (attention and MLP output projections: inputs split): A holds this rank's input columns,
  B is whole; the partial rank-r activations are summed over tp (reduce-scattered with sequence
  parallelism, B's gradient then summed over tp) before B.

A is drawn whole from the run's seed and sliced, so every layout starts from the same adapters. Only the
adapters train: checkpoints then hold the adapters alone and `AdapterRecord` (the base model's path as the run
named it and a fingerprint of its weights); `merge_adapters` folds them into the base weights for export,
generation and evaluation.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from trainer.config import LoraConfig, ModelConfig
from trainer.model import Block, mark_sequence_parallel, mark_split, tensor_parallel_active

# target -> (the block's submodule, its linear layer, column or row parallel)
TARGET_LAYERS = {
    "qkv": ("attn", "qkv", "column"),
    "attn_proj": ("attn", "proj", "row"),
    "fc": ("mlp", "fc", "column"),
    "mlp_proj": ("mlp", "proj", "row"),
}
ADAPTER_SUFFIX = "_lora"


def _tp() -> tuple[int, int]:
    """(tp size, tp rank); (1, 0) for a model built without a process group."""
    if not tensor_parallel_active():
        return 1, 0
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def _kaiming_uniform(rank: int, fan_in: int, seed: int) -> torch.Tensor:
    """A (rank, fan_in) drawn as `nn.Linear` initialises its weight, from its own generator."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on a (rank, fan_in) weight
    return torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)


class ColumnLoRA(nn.Module):
    """The adapter of a column-parallel layer: A (r, in) whole, B (out/tp, r) this rank's output rows."""

    def __init__(self, a: torch.Tensor, out_features: int, scale: float, dropout: float, sequence_parallel: bool):
        super().__init__()
        tp, _ = _tp()
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(torch.zeros(out_features // tp, a.shape[0]))
        mark_split(self.b, 0)
        self.scale, self.dropout, self.sequence_parallel = scale, nn.Dropout(dropout), sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the column layer takes it; the result is laid out as the layer's output."""
        z = F.linear(self.dropout(x), self.a)
        if self.sequence_parallel:  # the layer gathers the sequence chunks along dim 0: so do we
            z = tensor_parallel.gather_from_sequence_parallel_region(z, tensor_parallel_output_grad=True)
        elif tensor_parallel_active():
            z = tensor_parallel.copy_to_tensor_model_parallel_region(z)
        return F.linear(z, self.b) * self.scale


class RowLoRA(nn.Module):
    """The adapter of a row-parallel layer: A (r, in/tp) this rank's input columns, B (out, r) whole."""

    def __init__(self, a: torch.Tensor, out_features: int, scale: float, dropout: float, sequence_parallel: bool):
        super().__init__()
        tp, tp_rank = _tp()
        self.a = nn.Parameter(a.chunk(tp, dim=1)[tp_rank].contiguous())
        mark_split(self.a, 1)
        self.b = nn.Parameter(torch.zeros(out_features, a.shape[0]))
        self.scale, self.dropout, self.sequence_parallel = scale, nn.Dropout(dropout), sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the row layer takes it (this rank's inputs); the result is laid out as the layer's output."""
        z = F.linear(self.dropout(x), self.a)  # this rank's part of the sum over the inputs
        if self.sequence_parallel:
            z = tensor_parallel.reduce_scatter_to_sequence_parallel_region(z)
        elif tensor_parallel_active():
            z = tensor_parallel.reduce_from_tensor_model_parallel_region(z)
        return F.linear(z, self.b) * self.scale


def _layer_shape(target: str, model: ModelConfig) -> tuple[int, int]:
    """(in, out) features of a target layer, over all tp ranks."""
    d, ffn = model.n_embd, model.ffn_size
    return {"qkv": (d, 3 * d), "attn_proj": (d, d), "fc": (d, ffn), "mlp_proj": (ffn, d)}[target]


def add_adapters(module: nn.Module, lora: LoraConfig, model: ModelConfig, seed: int,
                 sequence_parallel: bool = False) -> None:
    """Give every block in `module` (a GPT or a pipeline stage) its adapters, and freeze everything else."""
    scale = lora.alpha / lora.rank
    for block in module.modules():
        if not isinstance(block, Block):
            continue
        for index, target in enumerate(lora.targets):
            parent_name, layer, kind = TARGET_LAYERS[target]
            fan_in, out_features = _layer_shape(target, model)
            a = _kaiming_uniform(lora.rank, fan_in, seed=(seed * 1_000_003 + block.layer_index) * 8 + index)
            adapter_type = ColumnLoRA if kind == "column" else RowLoRA
            adapter = adapter_type(a, out_features, scale, lora.dropout, sequence_parallel)
            if sequence_parallel:  # the replicated half is used on sequence chunks: sum its gradient over tp
                mark_sequence_parallel(adapter)
            setattr(getattr(block, parent_name), layer + ADAPTER_SUFFIX, adapter)
    for name, param in module.named_parameters():
        param.requires_grad = is_adapter_parameter(name)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter (by any of its names) belongs to a LoRA adapter."""
    return f"{ADAPTER_SUFFIX}." in name


def adapted_weight_name(adapter_param: str) -> str:
    """`blocks.0.attn.qkv_lora.a` -> `blocks.0.attn.qkv.weight`, the weight its adapter adds to."""
    module, _, _ = adapter_param.rpartition(".")
    return module.removesuffix(ADAPTER_SUFFIX) + ".weight"


def merge_adapters(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor],
                   scale: float) -> dict[str, torch.Tensor]:
    """The base weights with every adapter folded in, W + scale * B A (whole, single-process tensors)."""
    merged = dict(base)
    for name, a in adapters.items():
        if not name.endswith(f"{ADAPTER_SUFFIX}.a"):
            continue
        b = adapters[name[:-1] + "b"]
        target = adapted_weight_name(name)
        if target not in merged:
            raise KeyError(f"adapter {name!r} adapts {target!r}, which the base model does not have")
        merged[target] = merged[target] + scale * (b.double() @ a.double()).to(merged[target].dtype)
    return merged


def weights_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """crc32 over every tensor's name, shape and bytes: the same weights give the same hex string."""
    crc = 0
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        crc = zlib.crc32(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode(), crc)
        crc = zlib.crc32(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"", crc)
    return f"{crc:08x}"


@dataclass
class AdapterRecord:
    """What an adapter checkpoint says of its base: the path the run named (`train.init_from`), the fingerprint
    of the weights found there, and the adapters' shape. Loading one needs the base named again by the user."""

    base: str
    base_fingerprint: str
    rank: int
    alpha: float
    targets: list[str]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict:
        return asdict(self)


def adapter_record(raw: object, where: str) -> AdapterRecord:
    """The AdapterRecord a checkpoint's state holds; ValueError naming `where` when it is not one."""
    try:
        record = AdapterRecord(**raw)  # type: ignore[arg-type]
        ok = record.rank > 0 and record.alpha > 0 and all(t in TARGET_LAYERS for t in record.targets)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{where}: 'adapters' is {raw!r}, not a LoRA record (base, base_fingerprint, rank, alpha, "
                         "targets)")
    return record
