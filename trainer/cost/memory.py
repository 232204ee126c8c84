"""Memory per GPU for a parallel layout: model states under ZeRO, activations under 1F1B, and a verdict.

Model states, per parameter a rank holds (Rajbhandari et al. 2020, "ZeRO"):

    bf16 mixed precision: 2 (bf16 params) + 2 (bf16 grads) + 12 (fp32 master, Adam m and v) = 16 bytes
    fp32:                 4 (params)      + 4 (grads)      +  8 (Adam m and v; params are the master) = 16

Under LoRA (`lora_rank` > 0) only the adapters have gradients and optimizer state; the frozen base weights
count their parameter bytes alone.

ZeRO-1 divides the optimizer bytes by dp, ZeRO-2 also the gradients, ZeRO-3 also the parameters. A rank holds
its pipeline stage's layers split over tp (column-parallel weights and biases split, row-parallel biases
and LayerNorms replicated); the token table (split over tp) sits on the first stage and, as the tied
output layer, again on the last; positions on the first, the final LayerNorm on the last.

Activations per transformer layer and micro-batch, in bytes (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models"), s = seq_len, b = micro_batch, h = n_embd, a = n_head, t = tp:

    no recompute:   s*b*h * (10/t_sp + 24/t + 5*a*s/(h*t))   with t_sp = t under sequence parallelism, else 1
                    (= s*b*h*(34 + 5*a*s/h) at t = 1; 24 = 8 + 4*f/h for an MLP of width f, 16 at f = 4h)
    full recompute: 2*s*b*h / t_sp   (each layer's input), plus one layer's full activations while it is
                    recomputed in the backward pass

`5*a*s/h` are the attention scores, softmax and dropout mask; a flash-attention kernel never stores them
(`flash_attention=True` drops the term). fp32 training doubles the 2-byte activations (masks counted as
2-byte too: a slight overestimate). Under 1F1B the first stage holds min(pp, micro-batches) micro-batches in
flight, the last stage one, plus the fp32 softmax of the cross entropy, 4*s*b*V/t bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from trainer.config import HardwareConfig, ModelConfig
from trainer.cost.params import adapter_parameters_per_rank, layer_parameters_per_rank
from trainer.vocab import padded_vocab_size

GiB = 2**30
# Bytes per parameter a rank holds: (params, grads, optimizer states).
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}


@dataclass(frozen=True)
class Layout:
    """One way to lay a run out on GPUs: world size = tp * pp * dp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    micro_batch: int = 1
    seq_len: int = 2048
    recompute: bool = False
    sequence_parallel: bool = False
    # bf16: mixed precision (also fp16); fp32: everything in fp32.
    precision: str = "bf16"
    # Micro-batches per step and pipeline (gradient accumulation); None means pp (the fewest 1F1B allows).
    micro_batches: int | None = None
    flash_attention: bool = False
    # LoRA fine-tuning: adapters of this rank on these layers train, every other parameter is frozen.
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp", "micro_batch", "seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"layout.{key}={getattr(self, key)!r}: must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"layout.zero_stage={self.zero_stage!r}: must be one of 0, 1, 2, 3")
        if self.precision not in STATE_BYTES:
            raise ValueError(f"layout.precision={self.precision!r}: must be one of {', '.join(STATE_BYTES)}")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError(f"layout.micro_batches={self.micro_batches!r}: must be >= 1")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def in_flight(self) -> int:
        """Micro-batches whose activations the first pipeline stage holds at once under 1F1B."""
        return min(self.pp, self.micro_batches or self.pp)


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's bytes on its heaviest pipeline stage, and whether they fit in `budget`."""

    stage: str  # only | first | last
    params: float
    grads: float
    optimizer: float
    activations: float
    budget: float

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def headroom(self) -> float:
        """Bytes left over; negative is the shortfall."""
        return self.budget - self.total

    def as_gib(self) -> dict:
        """The figures in GiB, for reports."""
        figures = {k: v / GiB for k, v in asdict(self).items() if k != "stage"}
        figures.update(model_states=self.model_states / GiB, total=self.total / GiB, headroom=self.headroom / GiB)
        return {"stage": self.stage, **figures, "fits": self.fits}


def layer_activation_bytes(model: ModelConfig, layout: Layout) -> float:
    """Activation bytes one transformer layer keeps for one micro-batch (Korthikanti et al. 2022, eq. 1-3)."""
    s, b, h, a, t = layout.seq_len, layout.micro_batch, model.n_embd, model.n_head, layout.tp
    t_sp = t if layout.sequence_parallel else 1
    scores = 0.0 if layout.flash_attention else 5 * a * s / (h * t)
    width = 2 if layout.precision == "bf16" else 4
    return s * b * h * (10 / t_sp + (8 + 4 * model.ffn_size / h) / t + scores) * width / 2


def stage_activation_bytes(model: ModelConfig, vocab_size: int, layout: Layout, stage: str) -> float:
    """Activation bytes one rank of `stage` holds at its peak under 1F1B."""
    layers = math.ceil(model.n_layer / layout.pp)
    full = layer_activation_bytes(model, layout)
    if layout.recompute:
        t_sp = layout.tp if layout.sequence_parallel else 1
        width = 2 if layout.precision == "bf16" else 4
        per_layer = layout.seq_len * layout.micro_batch * model.n_embd * width / t_sp
        per_micro_batch = layers * per_layer
        live = full  # the layer being recomputed holds its full activations for its backward
    else:
        per_micro_batch, live = layers * full, 0.0
    in_flight = 1 if stage == "last" else layout.in_flight
    total = in_flight * per_micro_batch + live
    if stage in ("only", "last"):
        padded = padded_vocab_size(vocab_size, model.pad_vocab_to_multiple, layout.tp)
        total += 4 * layout.seq_len * layout.micro_batch * padded / layout.tp  # fp32 softmax of the loss
    return total


def stage_parameters_per_rank(model: ModelConfig, vocab_size: int, layout: Layout, stage: str) -> int:
    """Parameters one rank of `stage` holds before ZeRO-3 partitioning (the heaviest stage's layer count)."""
    d, tp = model.n_embd, layout.tp
    params = math.ceil(model.n_layer / layout.pp) * layer_parameters_per_rank(model, tp)
    tokens = padded_vocab_size(vocab_size, model.pad_vocab_to_multiple, tp) * d // tp
    if stage in ("only", "first"):
        params += tokens + model.block_size * d
    if stage in ("only", "last"):
        params += 2 * d + (tokens if stage == "last" else 0)
    return params


def estimate_memory(model: ModelConfig, vocab_size: int, layout: Layout, hardware: HardwareConfig) -> MemoryEstimate:
    """Bytes per GPU on the heaviest pipeline stage; `hardware.memory_gb` is read as GiB (an 80 GB A100 has 80 GiB)."""
    stages = ("only",) if layout.pp == 1 else ("first", "last")
    estimates = [_stage_memory(model, vocab_size, layout, hardware, stage) for stage in stages]
    return max(estimates, key=lambda e: e.total)


def _stage_memory(model: ModelConfig, vocab_size: int, layout: Layout, hardware: HardwareConfig,
                  stage: str) -> MemoryEstimate:
    params = stage_parameters_per_rank(model, vocab_size, layout, stage)
    trained = params
    if layout.lora_rank:
        trained = math.ceil(model.n_layer / layout.pp) * adapter_parameters_per_rank(
            model, layout.tp, layout.lora_rank, layout.lora_targets)
        params += trained
    param_width, grad_width, optimizer_width = STATE_BYTES[layout.precision]
    param_bytes, grad_bytes, optimizer_bytes = param_width * params, grad_width * trained, optimizer_width * trained
    dp, zero = layout.dp, layout.zero_stage
    if layout.precision == "fp32" and zero >= 1:
        # DeepSpeed's ZeRO optimizers keep their own fp32 master partition even when the model is fp32
        # (measured: docs/layouts.md), so fp32 ZeRO holds 4 more bytes per trained parameter, sharded like the rest.
        optimizer_bytes += 4 * trained
    return MemoryEstimate(
        stage=stage,
        params=param_bytes / (dp if zero >= 3 else 1),
        grads=grad_bytes / (dp if zero >= 2 else 1),
        optimizer=optimizer_bytes / (dp if zero >= 1 else 1),
        activations=stage_activation_bytes(model, vocab_size, layout, stage),
        budget=hardware.memory_gb * GiB,
    )
