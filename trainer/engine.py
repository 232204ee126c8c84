"""The training engine: one optimizer step and one evaluation pass, for pretraining and fine-tuning alike.

DeepSpeed does the heavy lifting (ZeRO, mixed precision, gradient accumulation and clipping); this module
builds its config from ours and exposes the two operations the step loop needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from trainer.config import Config, ConfigError
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel.topology import MegatronMPU, Topology

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` means bf16 on CUDA and fp32 on CPU; fp16 needs CUDA (its loss scaler does)."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs a CUDA device; use fp32 or bf16 on the CPU")
    return requested


def build_deepspeed_config(config: Config, precision: str) -> dict:
    """DeepSpeed's JSON config, generated from ours so there is one source of truth."""
    train = config.train
    ds_config: dict = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * config.parallel.dp,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # Autocast with fp32 master weights: matmuls in bf16, reductions and optimizer in fp32.
        ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        ds_config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds_config


def grad_norm(model: nn.Module) -> float:
    """Global L2 norm of the gradients, counting tensor-parallel replicas of a parameter once."""
    squares = torch.zeros((), dtype=torch.float32)
    for param in model.parameters():
        if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
            squares = squares + param.grad.detach().float().pow(2).sum().cpu()
    for group in (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_pipeline_model_parallel_group()):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(squares, group=group)
    return squares.sqrt().item()


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    lr: float


class Engine:
    """A model wrapped by DeepSpeed, with AdamW and the LR schedule, for one parallel layout."""

    def __init__(self, model: nn.Module, config: Config, topo: Topology):
        self.config = config
        self.topo = topo
        self.precision = resolve_precision(config.train.precision, topo.device)
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.train.max_steps)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=build_deepspeed_config(config, self.precision),
            mpu=MegatronMPU(),
        )

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def train_step(self, batches: Iterator[Batch]) -> StepResult:
        """One optimizer step over `grad_accum_steps` micro-batches; the loss is averaged over dp."""
        losses = []
        norm = None
        for _ in range(self.config.train.grad_accum_steps):
            inputs, targets = (t.to(self.topo.device, non_blocking=True) for t in next(batches))
            loss = self.ds(inputs, targets)
            # DeepSpeed divides by the accumulation count, so summed gradients are a mean.
            self.ds.backward(loss)
            if self.ds.is_gradient_accumulation_boundary():
                norm = self._grad_norm_before_step()
            self.ds.step()
            losses.append(loss.detach().float())
        tracked = self.ds.get_global_grad_norm()
        if tracked is not None:
            norm = float(tracked)
        return StepResult(
            loss=self._mean_over_data_parallel(torch.stack(losses).mean()),
            grad_norm=float("nan") if norm is None else norm,
            lr=self.scheduler.get_last_lr()[0],
        )

    def _grad_norm_before_step(self) -> float | None:
        # ZeRO and the mixed-precision optimizers report the norm themselves; plain fp32 does not.
        if self.config.parallel.zero_stage > 0 or self.precision == "fp16":
            return None
        return grad_norm(self.ds.module)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """Mean loss over the given batches (the same ones every time), averaged over dp."""
        self.ds.eval()
        total = torch.zeros((), dtype=torch.float32)
        for inputs, targets in batches:
            total += self.ds(inputs.to(self.topo.device), targets.to(self.topo.device)).float().cpu()
        self.ds.train()
        return self._mean_over_data_parallel(total / max(1, len(batches)))

    def _mean_over_data_parallel(self, value: torch.Tensor) -> float:
        value = value.detach().float().to(self.topo.device)
        if self.topo.dp > 1:
            dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
            value /= self.topo.dp
        return value.item()

    def optimizer_state(self) -> dict:
        """Optimizer and scheduler state, tensors and plain values only (loadable with weights_only)."""
        return {"optimizer": self.ds.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.ds.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
