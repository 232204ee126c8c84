"""Search parallel layouts for a model on N GPUs: what fits, and which is fastest under a simple time model.

Step time on one rank (every term in seconds, summed; data-parallel gradient reduction is assumed to overlap
the backward pass, as DeepSpeed and Megatron bucket it):

    compute   = global tokens * model FLOPs/token / (gpus * peak * base_mfu)
    recompute = the same for the extra forward of the blocks under full recompute (about +1/3)
    tp_comm   = per layer and micro-batch, 4 all-reduces (6 with recompute) of s*b*h activations
                (2 bytes in bf16), a ring moving 2*(t-1)/t of them per GPU over NVLink (`intra_node_bandwidth`)
    bubble    = (compute + recompute + tp_comm) * (pp - 1) / m: 1F1B idles (pp-1)/(m+pp-1) of the step,
                m = global_batch / (dp * micro_batch) micro-batches per step
    zero3     = ZeRO-3 all-gathers the stage's parameters for every micro-batch's forward and again for its
                backward: 2 * m * (dp-1)/dp * parameter bytes per rank over `inter_node_bandwidth`

The estimated MFU is base_mfu * compute / step time. A layout runs only if it fits in memory
(trainer.cost.memory), dp * micro_batch divides the global batch and there are at least pp micro-batches.
Not modelled: micro-batch size's effect on kernel efficiency, inter-node pipeline sends, stragglers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.config import HardwareConfig, ModelConfig
from trainer.cost.flops import hardware_flops_per_token, model_flops_per_token
from trainer.cost.memory import GiB, Layout, MemoryEstimate, estimate_memory, stage_parameters_per_rank
from trainer.vocab import padded_vocab_size

COMPONENTS = {"bubble": "pipeline bubble", "recompute": "recompute's extra forward",
              "tp_comm": "tensor-parallel all-reduces", "zero3": "ZeRO-3 parameter gathers"}


@dataclass(frozen=True)
class Assumptions:
    """The throughput model's knobs; defaults describe an A100/H100 cluster with one 200 Gb/s NIC per GPU."""

    base_mfu: float = 0.4
    # NVLink bytes/s per GPU and direction (A100: 600 GB/s both ways); tp stays inside a node.
    intra_node_bandwidth: float = 300e9
    inter_node_bandwidth: float = 25e9
    gpus_per_node: int = 8
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    # Memory kept free for the allocator's fragmentation, NCCL and temporary buffers the estimate omits.
    memory_reserve_fraction: float = 0.1


@dataclass
class Candidate:
    """One layout: its memory, step-time components, and why it runs or loses."""

    layout: Layout
    memory: MemoryEstimate
    times: dict[str, float] = field(default_factory=dict)
    # Why it cannot run at all (None if it can); `reason` says why it loses to the best.
    blocked: str | None = None
    reason: str = ""
    # What the reason is about: best, tie, one of COMPONENTS, batch, pipeline or memory.
    category: str = ""
    mfu: float = 0.0

    @property
    def step_seconds(self) -> float:
        return sum(self.times.values()) if self.blocked is None else float("inf")

    def as_dict(self) -> dict:
        layout = {k: getattr(self.layout, k) for k in ("tp", "pp", "dp", "zero_stage", "micro_batch",
                                                        "recompute", "sequence_parallel", "micro_batches")}
        return {**layout, "memory_gib": round(self.memory.total / GiB, 2),
                "headroom_gib": round(self.memory.headroom / GiB, 2), "fits": self.memory.fits,
                "step_seconds": None if self.blocked else round(self.step_seconds, 3),
                "mfu": round(self.mfu, 4), "category": self.category, "reason": self.reason}


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def search_layouts(model: ModelConfig, vocab_size: int, hardware: HardwareConfig, gpus: int, global_batch: int,
                   seq_len: int, precision: str = "bf16",
                   assumptions: Assumptions = Assumptions()) -> list[Candidate]:
    """Every (tp, pp, dp, micro_batch, zero_stage, recompute) for `gpus`, fastest runnable layout first.

    tp <= gpus per node and divides n_head and the MLP width; pp divides n_layer; dp = gpus / (tp * pp);
    sequence parallelism is on whenever tp > 1 (it only saves memory); ZeRO-2/3 only without a pipeline
    (DeepSpeed's pipeline engine takes ZeRO 0 or 1). Runnable layouts come first, ranked by step time
    (ties: less memory first); the rest follow, those that miss memory by the least first.
    """
    if hardware.peak_flops <= 0:
        raise ValueError(f"hardware.peak_flops={hardware.peak_flops!r}: needs the accelerator's peak ({hardware.name})")
    candidates = []
    for layout in _layouts(model, gpus, global_batch, seq_len, precision, assumptions):
        candidate = Candidate(layout, estimate_memory(model, vocab_size, layout, hardware))
        candidate.blocked = _blocked(candidate, global_batch, assumptions.memory_reserve_fraction)
        if candidate.blocked is None:
            candidate.times = step_times(model, vocab_size, hardware, layout, global_batch, assumptions)
            candidate.mfu = assumptions.base_mfu * candidate.times["compute"] / candidate.step_seconds
        candidates.append(candidate)
    runnable = sorted((c for c in candidates if c.blocked is None), key=lambda c: (c.step_seconds, c.memory.total))
    blocked = sorted((c for c in candidates if c.blocked), key=lambda c: -c.memory.headroom)
    if runnable:
        best = runnable[0]
        best.category, best.reason = "best", "best"
        for candidate in runnable[1:]:
            candidate.category, candidate.reason = _loses_because(candidate, best)
    for candidate in blocked:
        candidate.reason = candidate.blocked
    return runnable + blocked


def _layouts(model: ModelConfig, gpus: int, global_batch: int, seq_len: int, precision: str,
             assumptions: Assumptions):
    for tp in divisors(min(gpus, assumptions.gpus_per_node)):
        if model.n_head % tp or model.ffn_size % tp or gpus % tp:
            continue
        for pp in divisors(model.n_layer):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for micro_batch in assumptions.micro_batch_sizes:
                m = max(1, global_batch // (dp * micro_batch))
                for zero_stage in (0, 1) if pp > 1 else (0, 1, 2, 3):
                    for recompute in (False, True):
                        yield Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero_stage, micro_batch=micro_batch,
                                     seq_len=seq_len, recompute=recompute, sequence_parallel=tp > 1,
                                     precision=precision, micro_batches=m)


def _blocked(candidate: Candidate, global_batch: int, reserve_fraction: float) -> str | None:
    layout, memory = candidate.layout, candidate.memory
    if global_batch % (layout.dp * layout.micro_batch):
        candidate.category = "batch"
        return f"global batch {global_batch} is not a multiple of dp*micro_batch = {layout.dp * layout.micro_batch}"
    if layout.micro_batches < layout.pp:
        candidate.category = "pipeline"
        return f"{layout.micro_batches} micro-batches cannot fill {layout.pp} pipeline stages"
    if not memory.fits:
        candidate.category = "memory"
        return (f"doesn't fit: needs {memory.total / GiB:.1f} GiB, {-memory.headroom / GiB:.1f} GiB over "
                f"{memory.budget / GiB:.0f} GiB ({memory.stage} stage)")
    if memory.headroom < reserve_fraction * memory.budget:
        candidate.category = "reserve"
        return (f"too tight: {memory.total / GiB:.1f} of {memory.budget / GiB:.0f} GiB leaves less than the "
                f"{reserve_fraction:.0%} kept for fragmentation and buffers ({memory.stage} stage)")
    return None


def step_times(model: ModelConfig, vocab_size: int, hardware: HardwareConfig, layout: Layout, global_batch: int,
               assumptions: Assumptions = Assumptions()) -> dict[str, float]:
    """Seconds per optimizer step by component (module docstring): compute, recompute, tp_comm, bubble, zero3."""
    padded = padded_vocab_size(vocab_size, model.pad_vocab_to_multiple, layout.tp)
    s, b, m = layout.seq_len, layout.micro_batch, layout.micro_batches or layout.pp
    rate = layout.gpus * hardware.peak_flops * assumptions.base_mfu
    tokens = global_batch * s
    compute = tokens * model_flops_per_token(model, padded, s) / rate
    recompute = tokens * hardware_flops_per_token(model, padded, s, layout.recompute) / rate - compute
    width = 2 if layout.precision == "bf16" else 4
    tp_comm = 0.0
    if layout.tp > 1:
        all_reduces = 6 if layout.recompute else 4
        ring = 2 * (layout.tp - 1) / layout.tp * s * b * model.n_embd * width
        layers = model.n_layer // layout.pp
        tp_comm = layers * m * all_reduces * ring / assumptions.intra_node_bandwidth
    bubble = (compute + recompute + tp_comm) * (layout.pp - 1) / m
    zero3 = 0.0
    if layout.zero_stage == 3 and layout.dp > 1:
        stage_bytes = stage_parameters_per_rank(model, vocab_size, layout, "only") * width
        zero3 = 2 * m * (layout.dp - 1) / layout.dp * stage_bytes / assumptions.inter_node_bandwidth
    return {"compute": compute, "recompute": recompute, "tp_comm": tp_comm, "bubble": bubble, "zero3": zero3}


def _loses_because(candidate: Candidate, best: Candidate) -> tuple[str, str]:
    """(category, reason): the step-time component that costs `candidate` the most against `best`."""
    extra = {k: candidate.times[k] - best.times[k] for k in COMPONENTS}
    worst = max(extra, key=extra.get)
    slower = candidate.step_seconds / best.step_seconds - 1
    if slower <= 1e-9:
        more = (candidate.memory.total - best.memory.total) / GiB
        return "tie", f"ties on time; uses {more:.1f} GiB more memory" if more >= 0.05 else "ties with the best"
    share = candidate.times[worst] / candidate.step_seconds
    return worst, f"{slower:.1%} slower: {COMPONENTS[worst]} ({share:.1%} of its step)"
