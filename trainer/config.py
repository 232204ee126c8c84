"""Typed configuration: the dataclasses Hydra composes and validates before any process starts.

YAML under `conf/` selects presets and overrides fields; these dataclasses are the source of truth for
names, types and allowed values. Each `__post_init__` raises `ConfigError` naming the offending key.
"""

from __future__ import annotations

import difflib
import math
import re
import signal
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from data_pipeline.config import DataConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _require(ok: bool, key: str, problem: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {problem}")


def parse_signals(names: str) -> list[signal.Signals]:
    """`"SIGUSR1,SIGTERM"` as signals; an unknown name raises ConfigError naming it."""
    signals = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        try:
            signals.append(signal.Signals[name])
        except KeyError:
            raise ConfigError(f"train.preemption_signals: {name!r} is not a signal name (e.g. SIGUSR1)") from None
    return signals


def _require_choice(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, f"must be one of {', '.join(map(str, choices))}", value)


@dataclass
class ModelConfig:
    """GPT shape. Presets live in conf/model/."""

    name: str = "tiny"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    # Maximum context length (size of the learned position table).
    block_size: int = 256
    # The tokenizer's vocabulary, fixed by the preset (data.vocab_size follows it, and a prepared corpus whose
    # tokenizer has another size is refused). The token table is padded up to `pad_vocab_to_multiple` (x tp).
    vocab_size: int = 4096
    pad_vocab_to_multiple: int = 64
    # MLP width; None means 4 * n_embd.
    ffn_hidden_size: int | None = None
    bias: bool = True
    layernorm_eps: float = 1e-5
    # Dropout on the embedding and residual outputs (replicated tensors); 0 for pretraining.
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "pad_vocab_to_multiple"):
            _require(getattr(self, key) > 0, f"model.{key}", "must be positive", getattr(self, key))
        _require(
            self.n_embd % self.n_head == 0,
            "model.n_head",
            f"must divide model.n_embd={self.n_embd}",
            self.n_head,
        )
        _require(self.vocab_size > 0, "model.vocab_size", "must be positive", self.vocab_size)
        if self.ffn_hidden_size is not None:
            _require(self.ffn_hidden_size > 0, "model.ffn_hidden_size", "must be positive", self.ffn_hidden_size)
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)
        _require(self.layernorm_eps > 0, "model.layernorm_eps", "must be positive", self.layernorm_eps)
        _require(self.init_std > 0, "model.init_std", "must be positive", self.init_std)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.n_embd


@dataclass
class KernelsConfig:
    """Which implementation of each fused op the model calls (see kernels/)."""

    # auto: our Triton flash attention on CUDA, torch_sdpa elsewhere; triton: ours (on the CPU only
    # under TRITON_INTERPRET=1, for tests); torch_sdpa: F.scaled_dot_product_attention;
    # reference: explicit softmax(QK^T)V in torch.
    attention: str = "auto"
    # auto: our Triton kernel on CUDA, F.layer_norm elsewhere; triton; torch: F.layer_norm;
    # reference: the explicit mean/variance formula in torch.
    layernorm: str = "auto"

    def __post_init__(self) -> None:
        _require_choice("kernels.attention", self.attention, ("auto", "triton", "torch_sdpa", "reference"))
        _require_choice("kernels.layernorm", self.layernorm, ("auto", "triton", "torch", "reference"))


@dataclass
class ParallelConfig:
    """Parallel layout: world size = tp * pp * dp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    # ZeRO stage: 1 partitions optimizer states over dp, 2 also gradients, 3 also parameters.
    zero_stage: int = 0
    # Keep optimizer states (and the Adam step) in CPU memory: DeepSpeed's ZeRO-Offload.
    offload_optimizer: bool = False
    # How pipeline stages are cut: parameters (balanced by parameter count), uniform (by layer count),
    # or type:Block (balanced by transformer blocks).
    pipeline_partition: str = "parameters"
    # Megatron's sequence parallelism: LayerNorms, dropout and the residual stream hold 1/tp of the sequence
    # per rank (all-gather before and reduce-scatter after each tensor-parallel region). megatron-core's
    # sequence-parallel layers allocate their buffers on CUDA, so it is refused on the CPU.
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", "must be >= 1", getattr(self, key))
        _require_choice("parallel.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _require(
            not (self.pp > 1 and self.zero_stage >= 2),
            "parallel.zero_stage",
            f"DeepSpeed's pipeline engine supports ZeRO 0 or 1 only (parallel.pp={self.pp})",
            self.zero_stage,
        )
        _require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "parallel.offload_optimizer",
            "needs parallel.zero_stage >= 1 (ZeRO-Offload partitions the optimizer first)",
            self.offload_optimizer,
        )
        _require(
            self.pipeline_partition in ("parameters", "uniform", "type:Block"),
            "parallel.pipeline_partition",
            "must be parameters, uniform or type:Block",
            self.pipeline_partition,
        )
        _require(
            not self.sequence_parallel or self.tp > 1,
            "parallel.sequence_parallel",
            "needs parallel.tp > 1",
            self.sequence_parallel,
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay, linear warmup then decay to min_lr."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    # cosine | linear | constant (after warmup)
    decay: str = "cosine"
    # Global gradient-norm clipping threshold; 0 disables it.
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for key in ("lr", "weight_decay", "eps", "grad_clip"):  # inf passes the bounds below, and NaN would too
            _require(math.isfinite(getattr(self, key)), f"optim.{key}", "must be finite", getattr(self, key))
        _require(self.lr > 0, "optim.lr", "must be positive", self.lr)
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, optim.lr={self.lr}]", self.min_lr)
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _require(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)", self.beta1)
        _require(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)", self.beta2)
        _require(self.eps > 0, "optim.eps", "must be positive", self.eps)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _require_choice("optim.decay", self.decay, ("cosine", "linear", "constant"))
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0", self.grad_clip)


@dataclass
class TrainConfig:
    """The step loop: batch shape, length, evaluation, checkpoints, precision, device."""

    max_steps: int = 600
    # Passes over the training data (fine-tuning): when set, the run's length is this many epochs of the SFT
    # prepared directory's train split and replaces max_steps.
    epochs: Optional[int] = None  # noqa: UP045
    # Stop this process after this many steps (with a checkpoint); the LR schedule still spans max_steps.
    exit_after_steps: int | None = None
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    # Training sequence length; None means model.block_size.
    seq_len: int | None = None
    eval_interval: int = 100
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 200
    # false: no checkpoint when the run ends (benchmarks, smoke tests); a preempted run still writes one.
    final_checkpoint: bool = True
    keep_last_checkpoints: int = 2
    # A step whose gradient norm or loss is not finite is skipped (weights and Adam moments untouched, logged
    # as train/skipped_steps); this many skipped in a row stop the run: training has diverged.
    max_skipped_steps: int = 10
    # auto: continue from the latest checkpoint in run_dir if there is one; never: start fresh
    # (refused if run_dir already holds checkpoints); or a path to one checkpoint directory.
    resume: str = "auto"
    # Start from these weights (a checkpoint of any layout, a weights-only one from `trainer.convert from-hf`, or
    # a Hugging Face GPT-2 directory) with a fresh optimizer, LR schedule, step 0 and data position 0, at any
    # layout. Used only when the run starts fresh: once it has checkpoints of its own, resume takes over.
    init_from: Optional[str] = None  # noqa: UP045 - the form every OmegaConf version accepts
    run_name: str = "default"
    run_dir: str = "runs/default"
    seed: int = 1337
    # Recompute each transformer block's activations in the backward pass instead of storing them.
    activation_checkpointing: bool = False
    # auto: bf16 autocast on CUDA, fp32 on CPU.
    precision: str = "auto"
    # auto: cuda when available, else cpu.
    device: str = "auto"
    # Progress on rank 0: a tqdm bar on a terminal; where the output is not one (a SLURM job's log, nohup, CI) a
    # plain line per log interval instead (step, loss, tokens/s, MFU, ETA), never carriage returns.
    progress_bar: bool = True
    # Signals that mean "the machines are about to go": finish the step, checkpoint, exit for a requeue.
    # SIGUSR1 is launch.slurm's warning (--signal), SIGUSR2 Hydra's submitit launcher's, SIGTERM SLURM's last word.
    preemption_signals: str = "SIGUSR1,SIGUSR2,SIGTERM"
    # Exit status after such a stop (75 = EX_TEMPFAIL, "try again").
    preemption_exit_code: int = 75
    # Inside a SLURM job, rank 0 then runs `scontrol requeue` on it (launch/requeue.py).
    requeue_on_preemption: bool = True

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches", "log_interval",
                    "max_skipped_steps"):
            _require(getattr(self, key) > 0, f"train.{key}", "must be positive", getattr(self, key))
        for key in ("eval_interval", "checkpoint_interval", "keep_last_checkpoints"):
            _require(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0 disables)", getattr(self, key))
        if self.epochs is not None:
            _require(self.epochs > 0, "train.epochs", "must be positive (or null: train.max_steps)", self.epochs)
        if self.exit_after_steps is not None:
            _require(self.exit_after_steps > 0, "train.exit_after_steps", "must be positive", self.exit_after_steps)
        if self.seq_len is not None:
            _require(self.seq_len > 0, "train.seq_len", "must be positive", self.seq_len)
        _require(bool(self.resume), "train.resume", "must be auto, never or a checkpoint path", self.resume)
        _require(self.init_from is None or bool(self.init_from), "train.init_from",
                 "must be a checkpoint or Hugging Face directory, or null", self.init_from)
        _require_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _require_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _require(0 < self.preemption_exit_code < 256, "train.preemption_exit_code", "must be in 1..255",
                 self.preemption_exit_code)
        parse_signals(self.preemption_signals)


LORA_TARGETS = ("qkv", "attn_proj", "fc", "mlp_proj")


@dataclass
class LoraConfig:
    """Low-rank adapters: W x + (alpha / rank) B A x on the chosen linear layers, the base weights frozen."""

    # 0: no adapters (every parameter trains).
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # Layers that get adapters: attention qkv and output projection, MLP up and down projections.
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "finetune.lora.rank", "must be >= 0 (0: no adapters)", self.rank)
        _require(self.alpha > 0, "finetune.lora.alpha", "must be positive", self.alpha)
        _require(0 <= self.dropout < 1, "finetune.lora.dropout", "must be in [0, 1)", self.dropout)
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        _require(not unknown, "finetune.lora.targets", f"unknown layers {unknown}; choose from {list(LORA_TARGETS)}",
                 list(self.targets))
        _require(not self.rank or bool(self.targets), "finetune.lora.targets", "must name at least one layer",
                 list(self.targets))

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class FinetuneConfig:
    """What fine-tuning changes about the model: adapters (LoRA) or, by default, none (full fine-tuning)."""

    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LoggingConfig:
    """Where metrics go: a JSONL file per run always, W&B optionally."""

    wandb: bool = True
    wandb_project: str = "hydragpt"
    wandb_entity: str | None = None
    # offline keeps everything in a local run directory; `wandb sync` uploads it later.
    wandb_mode: str = "offline"
    jsonl: bool = True

    def __post_init__(self) -> None:
        _require_choice("logging.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))


_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # sbatch's MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
# A name usable as a SLURM partition/account and as a directory: letters, digits, `_`, `.`, `-`.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class ClusterConfig:
    """How processes are started. `local` runs on this machine."""

    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0
    # Ranks per machine; null means one per GPU (one per node on CPU nodes). Set it for several CPU ranks
    # per node; with GPUs it must equal gpus_per_node.
    tasks_per_node: int | None = None
    # A collective that waits longer than this fails instead of hanging (e.g. a peer rank died).
    collective_timeout_s: int = 600
    # sbatch settings for launch.slurm (its short arguments time=, partition=, ... set these too).
    partition: str | None = None
    account: str | None = None
    # Wall-clock limit in sbatch's format: 90 (minutes), 02:00:00, 1-12:00:00; null means the partition's.
    time_limit: str | None = None
    cpus_per_task: int = 8
    # Seconds before the time limit at which SLURM sends SIGUSR1: enough to finish a step and checkpoint.
    signal_lead_s: int = 120

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, "cluster.nodes", "must be >= 1", self.nodes)
        for key in ("partition", "account"):
            value = getattr(self, key)
            _require(value is None or bool(PLAIN_NAME.match(value)), f"cluster.{key}", "must be a plain SLURM name",
                     value)
        _require(self.time_limit is None or bool(_SLURM_TIME.match(self.time_limit)), "cluster.time_limit",
                 "must be like 90, 02:00:00 or 1-12:00:00", self.time_limit)
        _require(self.cpus_per_task >= 1, "cluster.cpus_per_task", "must be >= 1", self.cpus_per_task)
        _require(self.signal_lead_s >= 1, "cluster.signal_lead_s", "must be >= 1", self.signal_lead_s)
        _require(self.gpus_per_node >= 0, "cluster.gpus_per_node", "must be >= 0", self.gpus_per_node)
        if self.tasks_per_node is not None:
            _require(self.tasks_per_node >= 1, "cluster.tasks_per_node", "must be >= 1", self.tasks_per_node)
            _require(self.gpus_per_node in (0, self.tasks_per_node), "cluster.tasks_per_node",
                     f"must equal cluster.gpus_per_node={self.gpus_per_node} (one rank per GPU)",
                     self.tasks_per_node)
        _require(self.collective_timeout_s > 0, "cluster.collective_timeout_s", "must be positive",
                 self.collective_timeout_s)

    @property
    def ranks_per_node(self) -> int:
        """Processes started on each machine: tasks_per_node, else one per GPU, else one."""
        return self.tasks_per_node or self.gpus_per_node or 1


@dataclass
class HardwareConfig:
    """One accelerator's published figures, for MFU and cost; prices are editable.

    `name: auto` (conf/hardware/auto.yaml) is resolved when the run starts, by trainer/hardware.py: the preset
    of the GPU found, or the cpu preset; its nonzero fields override the preset's.
    """

    name: str = "auto"
    # Dense (no sparsity) peak FLOP/s per device: bf16/fp16 on tensor cores; 0 means unknown (measured instead).
    peak_flops: float = 0.0
    # fp32 matmuls: TF32 on tensor cores (when torch allows TF32) and full IEEE fp32 (torch's default).
    peak_flops_tf32: float = 0.0
    peak_flops_fp32: float = 0.0
    memory_gb: float = 0.0
    memory_bandwidth_gbps: float = 0.0
    price_per_hour: float = 0.0
    tdp_watts: float = 0.0

    def __post_init__(self) -> None:
        _require(bool(self.name), "hardware.name", "must name a preset or auto", self.name)
        for key in ("peak_flops", "peak_flops_tf32", "peak_flops_fp32", "memory_gb", "memory_bandwidth_gbps",
                    "price_per_hour", "tdp_watts"):
            _require(getattr(self, key) >= 0, f"hardware.{key}", "must be >= 0", getattr(self, key))

    @property
    def is_auto(self) -> bool:
        return self.name == "auto"

    def peak_for(self, precision: str, tf32: bool = False) -> float:
        """Dense peak FLOP/s for matmuls in `precision` (bf16, fp16 or fp32; fp32 as TF32 when `tf32`); 0 if
        the preset does not give it."""
        if precision in ("bf16", "fp16"):
            return self.peak_flops
        if precision == "fp32":
            return self.peak_flops_tf32 if tf32 else self.peak_flops_fp32
        raise ConfigError(f"train.precision={precision!r}: no peak for it (bf16, fp16 or fp32)")


@dataclass
class CostConfig:
    """The plan a run is reconciled against while it trains (see trainer/cost/reconcile.py)."""

    # Model FLOPs utilisation the plan assumes (GPT-3-class runs reach 0.35-0.55 on A100/H100).
    assumed_mfu: float = 0.4
    # Report where the step time goes when the run is slower than the plan by more than this fraction.
    gap_margin: float = 0.25
    # Tokens the run is budgeted for; None means train.max_steps x the global batch in tokens.
    token_budget: float | None = None
    # Time DeepSpeed's collectives (data-parallel all-reduce, ZeRO gathers and reduce-scatters, pipeline
    # transfers) through its comms logger; each is synchronised, so it slows a GPU run a little.
    time_communication: bool = False

    def __post_init__(self) -> None:
        _require(0 < self.assumed_mfu <= 1, "cost.assumed_mfu", "must be in (0, 1]", self.assumed_mfu)
        _require(self.gap_margin >= 0, "cost.gap_margin", "must be >= 0", self.gap_margin)
        if self.token_budget is not None:
            _require(self.token_budget > 0, "cost.token_budget", "must be positive", self.token_budget)


@dataclass
class DeepSpeedConfig:
    """Pass-through for DeepSpeed keys this config does not model; merged last into the generated JSON."""

    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        seq_len = self.seq_len
        _require(
            seq_len <= self.model.block_size,
            "train.seq_len",
            f"must be <= model.block_size={self.model.block_size}",
            seq_len,
        )
        # With train.epochs the run's length is known once the data is read (trainer/run.py checks it there).
        _require(
            self.train.epochs is not None or self.optim.warmup_steps <= self.train.max_steps,
            "optim.warmup_steps",
            f"must be <= train.max_steps={self.train.max_steps}",
            self.optim.warmup_steps,
        )
        _require(
            self.train.grad_accum_steps >= self.parallel.pp,
            "train.grad_accum_steps",
            f"the pipeline needs at least as many micro-batches as stages (parallel.pp={self.parallel.pp})",
            self.train.grad_accum_steps,
        )
        tp = self.parallel.tp
        _require(self.model.n_head % tp == 0, "parallel.tp", f"must divide model.n_head={self.model.n_head}", tp)
        _require(
            self.model.ffn_size % tp == 0, "parallel.tp", f"must divide the MLP width {self.model.ffn_size}", tp
        )
        if self.parallel.sequence_parallel:
            _require(seq_len % tp == 0, "parallel.sequence_parallel",
                     f"splits the sequence over tp ranks: parallel.tp={tp} must divide the sequence length {seq_len}",
                     True)
            # Every tp rank draws dropout masks from the same generator, so with chunks of one sequence on
            # different ranks the masks would repeat from chunk to chunk.
            _require(self.model.dropout == 0.0, "parallel.sequence_parallel",
                     f"needs model.dropout=0 (it is {self.model.dropout}): dropout masks would repeat across "
                     "the sequence chunks of the tp ranks", True)
            _require(self.finetune.lora.dropout == 0.0, "parallel.sequence_parallel",
                     f"needs finetune.lora.dropout=0 (it is {self.finetune.lora.dropout}): dropout masks would "
                     "repeat across the sequence chunks of the tp ranks", True)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.block_size

    @property
    def tokens_per_step(self) -> int:
        """Global batch in tokens: micro-batch x accumulation x data-parallel replicas x sequence."""
        t = self.train
        return t.micro_batch_size * t.grad_accum_steps * self.parallel.dp * self.seq_len


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore so YAML is type-checked against them."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("ranks_per_node"):
        # For conf/hydra/launcher/submitit_cluster.yaml: tasks per node as launch.slurm computes them, and
        # no GPU request on CPU nodes.
        OmegaConf.register_new_resolver(
            "ranks_per_node", lambda tasks, gpus: ClusterConfig(tasks_per_node=tasks, gpus_per_node=gpus).ranks_per_node
        )
        OmegaConf.register_new_resolver("none_if_zero", lambda value: value or None)


def compose_config(overrides: list[str]) -> Config:
    """Compose conf/config.yaml with Hydra overrides and validate it, as the training CLI does."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except HydraException as err:
            raise config_error(err) from None
    return to_config(cfg)


def config_error(err: Exception) -> ConfigError:
    """One line naming the key, from what Hydra or OmegaConf raised composing the config: an unknown key or
    preset, a value of the wrong type, an override that does not parse."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(err, ConfigError):
        return err
    if isinstance(err, MissingConfigException) and err.options and "/" in (err.missing_cfg_file or ""):
        group, _, name = err.missing_cfg_file.rpartition("/")
        return ConfigError(f"{group}={name}: no such preset (no {group}/{name}.yaml); "
                           f"choose one of {', '.join(sorted(err.options))}")
    if isinstance(err, OverrideParseException):
        key = err.override.partition("=")[0].lstrip("+~")
        detail = [line for line in _lines(err.message) if not line.startswith("Error parsing override")]
        return ConfigError(f"{key}: cannot parse {err.override!r}: {' '.join(detail[:1])}".rstrip(": "))
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return unknown_key(key, getattr(cause, "object_type", None))
    if isinstance(cause, OmegaConfBaseException) and key:
        return ConfigError(f"{key}: {_lines(str(cause))[0]}")
    # Hydra's own refusals (a sweep without --multirun, `+` on a key that exists) quote the key first.
    quoted = re.search(r"'([\w.]+)(=[^']*)?'", str(err))
    return ConfigError(f"{quoted.group(1) + ': ' if quoted else ''}{' '.join(_lines(str(err))) or type(err).__name__}")


def _lines(message: str) -> list[str]:
    """The non-empty lines of a library's message, stripped, without its links to the documentation."""
    return [line.strip() for line in message.splitlines() if line.strip() and not line.startswith("See https")]


def unknown_key(full_key: str, schema: type | None) -> ConfigError:
    """ConfigError for a key that `schema` (the dataclass of its section) has no field for."""
    section, _, name = full_key.rpartition(".")
    names = [f.name for f in fields(schema)] if is_dataclass(schema) else []
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {'.'.join(filter(None, (section, close[0])))}?" if close else ""
    return ConfigError(f"{full_key}: unknown key{hint}")


def reject_unknown_keys(cfg: Any, path: str = "") -> None:
    """Raise ConfigError for a key the schema lacks, which `+key=value` adds without a word.

    Sections typed by a dataclass take only its fields; a plain dict (deepspeed.extra) takes any key.
    """
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(cfg)
    if not is_dataclass(schema):
        return
    names = {f.name for f in fields(schema)}
    for key, node in cfg.items_ex(resolve=False):
        full_key = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise unknown_key(full_key, schema)
        if isinstance(node, DictConfig):
            reject_unknown_keys(node, full_key)


def to_config(cfg: Any) -> Config:
    """Turn a composed DictConfig into validated dataclasses; raises ConfigError naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    reject_unknown_keys(cfg)
    try:
        config = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:  # e.g. an interpolation that does not resolve (also a ValueError)
        # OmegaConf may wrap errors raised in __post_init__; surface ours unchanged.
        cause = err.__cause__ or err.__context__
        raise (cause if isinstance(cause, ConfigError) else config_error(err)) from None
    except ValueError as err:  # a section's own validation (e.g. DataConfig) names its key itself
        raise ConfigError(str(err)) from None
    if not isinstance(config, Config):
        raise ConfigError(f"config root has type {type(config).__name__}; expected Config (check conf/config.yaml)")
    return config
