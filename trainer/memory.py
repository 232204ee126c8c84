"""What each rank holds in memory: peak process RSS, peak device memory, and the bytes of its model states."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist

MB = 2**20


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of parameters and optimizer state this rank holds (ZeRO partitions counted as held)."""
    module_params = list(engine.module.parameters())
    param_bytes = sum(_held(p) * p.element_size() for p in module_params)
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    held = {_storage(p) for p in module_params}
    # fp32 master partitions kept by ZeRO / mixed-precision optimizers, unless they are the module's own
    # tensors (ZeRO-3 in fp32 updates the parameter partition in place). ZeRO-3 empties the base
    # optimizer's param groups between steps, so its partitions are read from the wrapper.
    masters = [p for g in base.param_groups for p in g["params"]]
    masters += getattr(optimizer, "fp32_partitioned_groups_flat", None) or []
    unique = {_storage(t): t for t in masters if torch.is_tensor(t) and _storage(t) not in held}
    master_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    state_bytes = sum(
        v.numel() * v.element_size() for s in base.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return {"params": param_bytes, "optimizer": master_bytes + state_bytes}


def _storage(tensor: torch.Tensor) -> int:
    tensor = tensor.ds_tensor if hasattr(tensor, "ds_tensor") else tensor
    return tensor.untyped_storage().data_ptr()


def _held(param: torch.nn.Parameter) -> int:
    # ZeRO-3 leaves an empty placeholder in the module and keeps this rank's slice in ds_tensor.
    return param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()


def rank_memory(engine, device: torch.device) -> dict[str, float]:
    """This rank's memory figures in MiB."""
    states = model_state_bytes(engine)
    figures = {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "params_mb": states["params"] / MB,
        "optimizer_mb": states["optimizer"] / MB,
    }
    if device.type == "cuda":
        figures["device_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
    return figures


def gather_rank_memory(engine, device: torch.device) -> list[dict[str, float]]:
    """Every rank's figures, in rank order (collective)."""
    mine = rank_memory(engine, device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone
