"""Moving weights and Adam moments between a DeepSpeed engine and layout-independent tensors.

A checkpoint holds, per tensor-parallel shard, the *full* fp32 values of every trained parameter under the name
the single-process GPT gives it (ZeRO partitions gathered, pipeline stage names mapped), with the
dimension it is split along over tp. Loading concatenates the saved tp shards and slices them for the
new tp rank, so a run can resume at any (tp, pp, dp, ZeRO stage) layout. Frozen parameters (the base model
under LoRA adapters) are not saved: they come back from where the run took them (`train.init_from`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from trainer.parallel.pipeline import canonical_name

MOMENTS = ("exp_avg", "exp_avg_sq")


def named_parameters(engine, n_layer: int, pipeline: bool) -> Iterator[tuple[str, nn.Parameter]]:
    """This rank's parameters under their single-process names."""
    for name, param in engine.module.named_parameters():
        yield (canonical_name(name, n_layer) if pipeline else name), param


def trained(name: str, param: nn.Parameter) -> bool:
    """The parameters a checkpoint holds and a resume sets: all of them, but for a frozen base under adapters."""
    return param.requires_grad


def partition_dim(param: nn.Parameter) -> int | None:
    """The dimension megatron-core splits this parameter along over tp, or None if it is replicated."""
    return int(param.partition_dim) if getattr(param, "tensor_model_parallel", False) else None


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (ZeRO and mixed-precision wrappers hold it as .optimizer)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _optimized_tensors(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer updates (and keys its state by): parameters or flat fp32 partitions.

    ZeRO-3 takes its flat partitions out of the optimizer's param groups between steps and keeps them in
    `fp32_partitioned_groups_flat`; a run resumed into ZeRO-3 has not stepped yet, so they are read there.
    """
    base = _base_optimizer(engine)
    tensors = [tensor for group in base.param_groups for tensor in group["params"]]
    tensors += getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or []
    return list({id(tensor): tensor for tensor in tensors}.values())


def _zero_partitioned(engine) -> bool:
    return engine.zero_optimization_stage() > 0


def _materialize_moments(engine) -> None:
    """Make sure every flat fp32 partition has Adam moments, and that ZeRO-1/2 params point at them.

    Torch's Adam creates its state lazily, and ZeRO-1/2 link each parameter to its slice of that state
    only once, after the first step; a group that had no state then (or a run not yet stepped) would
    have no moments to read or write.
    """
    base = _base_optimizer(engine)
    for flat in _optimized_tensors(engine):
        state = base.state[flat]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        state.setdefault("step", torch.tensor(0.0))
    groups = getattr(engine.optimizer, "bit16_groups", None)
    partitions = getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
    if groups is not None and partitions is not None:
        for lp_params, flat in zip(groups, partitions, strict=True):
            lazy_init_hp_params_optimizer_state(lp_params, flat, base.state)


def adam_step(engine) -> int:
    """How many Adam updates the moments have seen (0 before the first step)."""
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def gather_full_state(engine, n_layer: int, pipeline: bool) -> tuple[dict, dict, dict]:
    """(weights, moments, partition dims) of this rank's tp shard, full over dp. Collective over dp."""
    weights, moments, dims = {}, {}, {}
    zero = _zero_partitioned(engine)
    base = _base_optimizer(engine)
    if zero:
        _materialize_moments(engine)
    for name, param in named_parameters(engine, n_layer, pipeline):
        if not trained(name, param):
            continue
        dims[name] = partition_dim(param)
        if zero:
            weights[name] = safe_get_full_fp32_param(param).detach().float().cpu()
            for key in MOMENTS:
                moments[f"{key}/{name}"] = safe_get_full_optimizer_state(param, key).detach().float().cpu()
        else:
            weights[name] = param.detach().float().cpu()
            state = base.state.get(param, {})
            for key in MOMENTS:
                value = state.get(key)
                moments[f"{key}/{name}"] = (torch.zeros_like(weights[name]) if value is None
                                            else value.detach().float().cpu())
    return weights, moments, dims


def local_slice(full: torch.Tensor, dim: int | None, tp_rank: int, tp: int, local_shape: torch.Size) -> torch.Tensor:
    """This tp rank's slice of a full tensor; vocab rows are trimmed or zero-padded to the new padding."""
    if dim is None:
        return full
    rows = local_shape[dim] * tp
    if full.shape[dim] != rows:  # the padded vocabulary depends on tp; padding rows are masked anyway
        if full.shape[dim] > rows:
            full = full.narrow(dim, 0, rows)
        else:
            pad_shape = list(full.shape)
            pad_shape[dim] = rows - full.shape[dim]
            full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank].contiguous()


def apply_full_state(
    engine, n_layer: int, pipeline: bool, read: Callable[[str], torch.Tensor], tp_rank: int, tp: int,
    step: int | None, select: Callable[[str, nn.Parameter], bool] = trained,
) -> None:
    """Set this rank's weights, and the Adam moments of the trained ones, from full tensors; `read(key)` returns
    one by name. Only the parameters `select` picks are set; `step` (unless None) becomes Adam's step count."""
    zero = _zero_partitioned(engine)
    base = _base_optimizer(engine)
    if zero:
        _materialize_moments(engine)
    for name, param in named_parameters(engine, n_layer, pipeline):
        if not select(name, param):
            continue
        shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
        dim = partition_dim(param)

        def local(key: str, dim=dim, shape=shape, device=param.device) -> torch.Tensor:
            return local_slice(read(key), dim, tp_rank, tp, shape).to(device)

        weight = local(name)
        if not param.requires_grad:  # frozen: no master copy, no moments
            _set_low_precision_copy(param, weight)
        elif zero:
            _set_low_precision_copy(param, weight)
            safe_set_full_fp32_param(param, weight)
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, local(f"{key}/{name}"), key)
        else:
            with torch.no_grad():
                param.copy_(weight)
            base.state[param] = {key: local(f"{key}/{name}").to(param.dtype) for key in MOMENTS}
    if step is not None:
        _set_adam_step(base, _optimized_tensors(engine), step)


def _set_low_precision_copy(param: nn.Parameter, value: torch.Tensor) -> None:
    """The module's own copy of a parameter: whole under ZeRO-1/2, this rank's flat partition under ZeRO-3."""
    with torch.no_grad():
        if hasattr(param, "ds_tensor"):
            part = param.ds_tensor
            start = part.numel() * dist.get_rank(group=param.ds_process_group)
            flat = value.flatten().to(part.dtype)
            chunk = flat[start : start + part.numel()]
            part.zero_()
            part.view(-1)[: chunk.numel()].copy_(chunk)
        else:
            param.copy_(value.to(param.dtype))


def _set_adam_step(base: torch.optim.Optimizer, tensors: list[torch.Tensor], step: int) -> None:
    for tensor in tensors:
        state = base.state.setdefault(tensor, {})
        old = state.get("step")
        state["step"] = torch.tensor(float(step)) if old is None or torch.is_tensor(old) else step
