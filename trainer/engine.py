"""The training engine: one optimizer step and one evaluation pass, for pretraining and fine-tuning alike.

DeepSpeed does the heavy lifting (ZeRO, pipeline schedule, mixed precision, gradient accumulation and
clipping); this module builds the model for the layout, generates DeepSpeed's config from ours, and
exposes the two operations the step loop needs. With pp > 1 the model is a PipelineModule and DeepSpeed's
pipeline engine runs the 1F1B schedule over the micro-batches; with pp = 1 it is the plain GPT module,
which also allows ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from trainer.checkpoint import CheckpointReader, ShardState
from trainer.config import Config, ConfigError
from trainer.lora import AdapterRecord, add_adapters, is_adapter_parameter
from trainer.model import GPT
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.parallel.pipeline import build_pipeline
from trainer.parallel.topology import MegatronMPU, Topology
from trainer.sharded_state import adam_step, apply_full_state, gather_full_state
from trainer.timers import PhaseTimer

log = logging.getLogger(__name__)

# (inputs, targets) for pretraining; packed fine-tuning samples add (loss_mask, segment_ids, positions).
Batch = tuple[torch.Tensor, ...]
PACKED_FIELDS = 5
# The phase DeepSpeed's collectives are timed under; it overlaps backward and optimizer, not adds to them.
COMMUNICATION = "communication"


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` means bf16 on CUDA and fp32 on CPU; fp16 needs CUDA (its loss scaler does)."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs a CUDA device; use fp32 or bf16 on the CPU")
    return requested


def build_deepspeed_config(config: Config, precision: str) -> dict:
    """DeepSpeed's JSON config, generated from ours so there is one source of truth."""
    train, parallel, optim = config.train, config.parallel, config.optim
    zero: dict = {"stage": parallel.zero_stage}
    ds_config: dict = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * parallel.dp,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if parallel.offload_optimizer:
        # ZeRO-Offload runs Adam on the CPU with DeepSpeed's own kernel, so DeepSpeed builds the optimizer.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds_config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
                       "weight_decay": optim.weight_decay},
        }
    if parallel.sequence_parallel:
        # The pipeline engine sends each tp rank 1/tp of an activation and all-gathers it on the next stage,
        # which assumes activations are the same on every tp rank; with sequence parallelism each holds its
        # own chunk, so every rank sends its whole (already 1/tp-sized) tensor.
        ds_config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if config.cost.time_communication:
        ds_config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    if precision == "bf16":
        # Autocast with fp32 master weights: matmuls in bf16, reductions and optimizer in fp32.
        ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        ds_config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return _merge(ds_config, config.deepspeed.extra)


def _merge(base: dict, extra: dict) -> dict:
    """`extra` merged into `base`, nested dicts key by key (deepspeed.extra wins)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def global_grad_norm(module: nn.Module) -> float:
    """L2 norm of the whole model's gradient: tp replicas and the pipeline's tied copies counted once."""
    squares = torch.zeros((), dtype=torch.float32, device=next(module.parameters()).device)
    for param in module.parameters():
        if param.grad is None or getattr(param, "ds_pipe_replicated", False):
            continue
        if param_is_not_tensor_parallel_duplicate(param):
            squares += param.grad.detach().float().pow(2).sum()
    for group in (parallel_state.get_tensor_model_parallel_group(),
                  parallel_state.get_pipeline_model_parallel_group()):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(squares, group=group)
    return squares.sqrt().item()


def _to_device(value, device: torch.device):
    """A tensor, or a tuple of them, on `device`."""
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value.to(device, non_blocking=True)


def build_model(config: Config, vocab_size: int, topo: Topology) -> nn.Module:
    """The GPT for this rank: the whole model (pp = 1) or its pipeline stage (pp > 1), with LoRA adapters
    (and everything else frozen) when `finetune.lora.rank` > 0."""
    if config.parallel.sequence_parallel and not sequence_parallel_supported(topo.device):
        raise ConfigError("parallel.sequence_parallel=true needs CUDA: megatron-core's sequence-parallel "
                          "layers allocate their buffers on the current CUDA device; turn it off on the CPU")
    if topo.pp > 1:
        model = build_pipeline(config, vocab_size, topo)
    else:
        model = GPT(config.model, config.kernels, vocab_size, config.train.seed,
                    activation_checkpointing=config.train.activation_checkpointing,
                    sequence_parallel=config.parallel.sequence_parallel)
    if config.finetune.lora.enabled:
        add_adapters(model, config.finetune.lora, config.model, config.train.seed, config.parallel.sequence_parallel)
    return model


def optimizer_checks_overflow(engine) -> bool:
    """True when DeepSpeed wraps the optimizer in one of its own (ZeRO, fp16, bf16), which skips a step
    whose gradient norm is not finite by itself; otherwise it steps our plain AdamW and clips with
    `clip_fp32_gradients` (the condition of `DeepSpeedEngine._take_model_step`)."""
    return bool(engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())


def sequence_parallel_supported(device: torch.device) -> bool:
    """megatron-core's sequence-parallel layers put their buffers on `torch.cuda.current_device()`."""
    return device.type == "cuda"


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    lr: float
    # Seconds per phase of this step (data, forward, backward, optimizer; or pipeline).
    phases: dict[str, float] = field(default_factory=dict)
    # The update was not applied (non-finite gradients): weights and Adam moments are as they were.
    skipped: bool = False


class Engine:
    """A model wrapped by DeepSpeed, with AdamW and the LR schedule, for one parallel layout."""

    def __init__(self, model: nn.Module, config: Config, topo: Topology):
        self.config = config
        self.topo = topo
        self.pipeline = topo.pp > 1
        self.precision = resolve_precision(config.train.precision, topo.device)
        ds_config = build_deepspeed_config(config, self.precision)
        schedule = functools.partial(build_scheduler, cfg=config.optim, max_steps=config.train.max_steps)
        if config.parallel.offload_optimizer:
            optimizer, params = None, param_groups(model, config.optim.weight_decay)
        else:
            optimizer, params = build_optimizer(model, config.optim), None
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=schedule,
            config=ds_config, mpu=None if self.pipeline else MegatronMPU(),
        )
        self._last_grad_norm: float | None = None
        self._skipped = False
        # Under LoRA, the base model the adapters sit on (set when its weights are loaded); saved with them.
        self.adapters: AdapterRecord | None = None
        self._guard_updates()
        self.timer = PhaseTimer(topo.device)

    # Skipping non-finite steps. Everything here that depends on DeepSpeed's insides (0.19.8), each with a
    # test in tests/test_nonfinite.py that fails loudly if DeepSpeed changes it:
    # - `DeepSpeedEngine._take_model_step(lr_kwargs)` applies every update; the pipeline engine's
    #   OptimizerStep instruction calls it too. We wrap it on the instance.
    # - After `optimizer.step()` it reads `optimizer.overflow`: when true it adds one to `skipped_steps`
    #   and leaves the LR scheduler alone (its fp16 loss scaler's path), and zeroes the gradients either way.
    # - The ZeRO 1/2/3 optimizers reduce the gradient norm over dp and the model-parallel group inside
    #   `step()`; when it is not finite they discard the gradients, set `overflow` and update nothing.
    # - `clip_fp32_gradients()` is called for the plain optimizer only (no ZeRO, fp16 or bf16 optimizer).
    # A non-finite loss makes the gradients it flows into non-finite, so the norm catches it too (with
    # pp > 1 the loss lives on the last stage, and the norm is reduced over the pipeline): every rank
    # decides alike, from the same global norm.

    def _guard_updates(self) -> None:
        """Skip the update of a step whose global gradient norm is not finite, the same way on every rank."""
        engine = self.ds
        take_model_step = engine._take_model_step
        plain = not optimizer_checks_overflow(engine)

        def guarded_take_model_step(lr_kwargs=None) -> None:
            if plain:
                self._drop_non_finite_gradients()
            skipped_before = engine.skipped_steps
            take_model_step(lr_kwargs)
            self._skipped = engine.skipped_steps > skipped_before
            if self._skipped:
                # The LR is a function of the step, skipped or not, so a resumed run meets the same rates.
                self.scheduler.step()

        engine._take_model_step = guarded_take_model_step
        engine.clip_fp32_gradients = self._clip_fp32_gradients

    def _drop_non_finite_gradients(self) -> None:
        """Plain optimizer: the whole model's gradient norm; if it is not finite, no gradient survives.

        torch's AdamW leaves a parameter without a gradient, and its moments and step count, untouched,
        so the step that follows updates nothing; `overflow` makes DeepSpeed count it as skipped."""
        norm = global_grad_norm(self.ds.module)
        self._last_grad_norm = norm
        overflow = not math.isfinite(norm)
        if overflow:
            for param in self.ds.module.parameters():
                param.grad = None
        self.ds.optimizer.overflow = overflow

    def _clip_fp32_gradients(self) -> None:
        # In fp32 without ZeRO, DeepSpeed's clipping counts the pipeline's tied embedding twice (once per
        # stage holding it) and drops the norm it computed. Clip with the norm of the whole model that
        # `_drop_non_finite_gradients` measured (ZeRO and the mixed-precision optimizers report theirs).
        norm = self._last_grad_norm
        if norm is None or not math.isfinite(norm):
            return  # a skipped step: its gradients are gone
        coefficient = self.ds.gradient_clipping() / (norm + 1e-6)
        if coefficient < 1.0:
            for param in self.ds.module.parameters():
                if param.grad is not None:
                    param.grad.detach().mul_(coefficient)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def train_step(self, batches: Iterator[Batch]) -> StepResult:
        """One optimizer step over `grad_accum_steps` micro-batches; the loss is averaged over dp."""
        self._last_grad_norm = None
        self._skipped = False
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses; stepping moves it on
        micro_batches = self._model_inputs(batches, self.config.train.grad_accum_steps)
        if self.pipeline:
            # The pipeline engine pulls its micro-batches itself and returns their mean loss; its data
            # waits, forward/backward passes, transfers and optimizer step are one schedule.
            with self.timer.phase("pipeline"):
                loss = self.ds.train_batch(data_iter=micro_batches).detach().float()
        else:
            loss = self._accumulate(micro_batches)
        tracked = self.ds.get_global_grad_norm()
        norm = float(tracked) if tracked is not None else self._last_grad_norm
        return StepResult(
            loss=self._mean_over_data_parallel(loss),
            grad_norm=float("nan") if norm is None else norm,
            lr=lr,
            phases=self.timer.pop() | self._communication_seconds(),
            skipped=self._skipped,
        )

    def _communication_seconds(self) -> dict[str, float]:
        """Seconds DeepSpeed's comms logger timed since the last step (empty when it is off)."""
        logger = deepspeed.comm.comm.comms_logger
        if not logger.enabled:
            return {}
        # Records are {op: {message size: [count, latencies in ms, algbw, busbw]}}; drain them each step.
        total_ms = sum(sum(record[1]) for sizes in logger.comms_dict.values() for record in sizes.values())
        logger.comms_dict = {}
        return {COMMUNICATION: total_ms / 1000}

    def _model_inputs(self, batches: Iterator[Batch], count: int) -> Iterator[tuple]:
        """The next `count` micro-batches as the model takes them, `(inputs, labels)`.

        Pretraining batches pass through lazily. Packed samples are read together: their labels become
        `(targets, weights)` with weights = loss mask x count x dp / valid tokens of the global batch (every
        micro-batch of every dp replica), so that after DeepSpeed's mean over micro-batches and dp replicas
        the loss is the mean over the valid tokens of the whole global batch, whatever the layout.
        """
        with self.timer.phase("data"):
            first = next(batches)
            if len(first) != PACKED_FIELDS:
                return itertools.chain([first], itertools.islice(batches, count - 1))
            packed = [first, *itertools.islice(batches, count - 1)]
            valid = sum(batch[2].sum() for batch in packed).float().to(self.topo.device)
            if self.topo.dp > 1:
                dist.all_reduce(valid, group=parallel_state.get_data_parallel_group())
            scale = count * self.topo.dp / valid.clamp(min=1.0)
        return iter([((ids, segments, positions), (targets, mask.to(scale.device) * scale))
                     for ids, targets, mask, segments, positions in packed])

    def _accumulate(self, batches: Iterator[tuple]) -> torch.Tensor:
        losses = []
        for _ in range(self.config.train.grad_accum_steps):
            with self.timer.phase("data"):
                inputs, targets = (_to_device(t, self.topo.device) for t in next(batches))
            with self.timer.phase("forward"):
                loss = self.ds(inputs, targets)
            # DeepSpeed divides by the accumulation count, so summed gradients are a mean. Gradient
            # all-reduce / reduce-scatter over dp happens inside backward (ZeRO-2/3 hooks) or step.
            with self.timer.phase("backward"):
                self.ds.backward(loss)
            with self.timer.phase("optimizer"):
                self.ds.step()
            losses.append(loss.detach().float())
        return torch.stack(losses).mean()

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """Mean loss over the given batches (the same ones every time), averaged over dp."""
        inputs = list(self._model_inputs(iter(batches), len(batches)))
        if self.pipeline:
            loss = self.ds.eval_batch(data_iter=itertools.cycle(inputs), num_micro_batches=len(inputs))
            return self._mean_over_data_parallel(loss.detach().float())
        self.ds.eval()
        total = torch.zeros((), dtype=torch.float32)
        for ids, labels in inputs:
            total += self.ds(_to_device(ids, self.topo.device), _to_device(labels, self.topo.device)).float().cpu()
        self.ds.train()
        return self._mean_over_data_parallel(total / max(1, len(batches)))

    def shard_state(self) -> ShardState:
        """This rank's tp/pp shard of weights and Adam moments, full over dp. Collective: call on all ranks."""
        n_layer = self.config.model.n_layer
        weights, moments, dims = gather_full_state(self.ds, n_layer, self.pipeline)
        return ShardState(weights, moments, dims, adam_step(self.ds))

    def load_full_state(self, reader: CheckpointReader) -> None:
        """Load weights and Adam moments saved at any layout into this rank's shard."""
        apply_full_state(self.ds, self.config.model.n_layer, self.pipeline, reader.read,
                         self.topo.tp_rank, self.topo.tp, reader.adam_step)
        # The LR is a function of the step: move the schedule to where the checkpoint left it. (Torch
        # warns when a scheduler steps before its optimizer ever has; here that is the point.)
        self.scheduler.last_epoch = reader.state.step - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def load_weights(self, read: Callable[[str], torch.Tensor]) -> None:
        """Set the model's weights from full single-process tensors (`read(name)`), with fresh Adam moments and
        step 0. Under LoRA these are the frozen base weights: the adapters and the optimizer are left alone."""

        def weights_and_zero_moments(key: str) -> torch.Tensor:
            kind, _, name = key.rpartition("/")
            return torch.zeros_like(read(name)) if kind else read(key)

        lora = self.config.finetune.lora.enabled
        apply_full_state(self.ds, self.config.model.n_layer, self.pipeline, weights_and_zero_moments,
                         self.topo.tp_rank, self.topo.tp, step=None if lora else 0,
                         select=lambda name, _: not is_adapter_parameter(name))

    def _mean_over_data_parallel(self, value: torch.Tensor) -> float:
        value = value.detach().float().to(self.topo.device)
        if self.topo.dp > 1:
            dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
            value /= self.topo.dp
        return value.item()
