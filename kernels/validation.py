"""Check each Triton kernel against its torch reference on the device it will run on, once per process.

`auto` (kernels.attention / kernels.layernorm) uses a Triton kernel on a GPU only after it has matched the
reference there: small seeded inputs in the run's dtype, forward and backward, every compiled variant the
run needs (attention per head dim, GQA group and segmented or not; the norms per row width). A mismatch, or
an exception such as a compile failure on an unsupported GPU, logs one warning line and `auto` takes the
torch path (SDPA / F.layer_norm / F.rms_norm). `triton` forces the kernel without a check.

The check is the same code on every device: under TRITON_INTERPRET=1 it runs the kernels on CPU tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import attention as attention_kernels
from kernels import layernorm as layernorm_kernels

log = logging.getLogger(__name__)

# Device types on which `auto` may pick a Triton kernel once it has passed its check (tests add "cpu" to run
# the same dispatch under Triton's interpreter).
TRITON_DEVICE_TYPES = ("cuda",)
# The Triton kernel's error (relative to the largest reference value) may be at most TORCH_ERROR_FACTOR
# times the torch path's error on the same inputs plus this floor. fp32's floor covers TF32: tl.dot rounds
# fp32 operands to 10-bit mantissas on NVIDIA GPUs where torch's fp32 matmuls keep full precision. Errors
# seen under the interpreter at these shapes: fp32 ~3e-7, fp16 ~1e-3, bf16 (norms) ~6e-3; a softmax scale
# 5% off gives 7e-2.
ERROR_FLOOR = {torch.float32: 1e-2, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DEFAULT_ERROR_FLOOR = 1e-6  # fp64 (the norm kernels accept it)
TORCH_ERROR_FACTOR = 2.0
SEED = 1234
EPS = 1e-5
BATCH, KV_HEADS = 2, 1  # query heads: KV_HEADS * group
# A multiple of 16 like training lengths (Triton compiles a separate variant for integer arguments that are
# not), and not a multiple of the 32-128 row tiles, so that the ragged last block is checked too.
SEQ_LEN = 112
# Segment boundaries of the two rows of the segmented attention check: packed samples of uneven lengths.
SEGMENT_STARTS = ((40, 90), (7, 60))
NORM_ROWS = (2, 3)  # leading dims of the norm check's input: six rows of the run's width

_verdicts: dict[tuple, bool] = {}


@dataclass(frozen=True)
class KernelCheck:
    """One kernel's check: seeded inputs, the Triton function, the torch path `auto` falls back to, and a
    reference run in fp64. Each function takes the differentiable tensors positionally, the rest by name."""

    # (generator, **variant) -> ({name: differentiable fp64 CPU tensor}, {name: other argument})
    make_inputs: Callable[..., tuple[dict[str, torch.Tensor], dict]]
    triton: Callable[..., torch.Tensor]
    torch_path: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    fallback: str  # what `auto` uses instead, for the log line


def _attention_inputs(gen: torch.Generator, head_dim: int, group: int = 1, segmented: bool = False):
    q = torch.randn(BATCH, KV_HEADS * group, SEQ_LEN, head_dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(BATCH, KV_HEADS, SEQ_LEN, head_dim, generator=gen, dtype=torch.float64) for _ in "kv")
    segment_ids = None
    if segmented:
        starts = torch.tensor(SEGMENT_STARTS)  # (BATCH, segments - 1)
        segment_ids = (torch.arange(SEQ_LEN)[None, :, None] >= starts[:, None, :]).sum(-1)  # starts passed
    return {"q": q, "k": k, "v": v}, {"segment_ids": segment_ids}


def _norm_inputs(gen: torch.Generator, width: int, has_bias: bool = True):
    x = 2.0 * torch.randn(*NORM_ROWS, width, generator=gen, dtype=torch.float64) + 0.5  # rows off zero mean
    weight = 1.0 + 0.5 * torch.randn(width, generator=gen, dtype=torch.float64)
    bias = 0.5 * torch.randn(width, generator=gen, dtype=torch.float64)
    if has_bias:
        return {"x": x, "weight": weight, "bias": bias}, {"eps": EPS}
    return {"x": x, "weight": weight}, {"bias": None, "eps": EPS}


def _rms_inputs(gen: torch.Generator, width: int):
    tensors, _ = _norm_inputs(gen, width, has_bias=False)
    return tensors, {"eps": EPS}


def _flash_attention(q, k, v, segment_ids=None):
    return attention_kernels.flash_attention(q, k, v, causal=True, segment_ids=segment_ids)


def _sdpa(q, k, v, segment_ids=None):
    return attention_kernels.attention_sdpa(q, k, v, segment_ids)


def _attention_reference(q, k, v, segment_ids=None):
    return attention_kernels.attention_reference(q, k, v, segment_ids)


def _layer_norm_triton(x, weight, bias, eps):
    return layernorm_kernels.layer_norm_triton(x, weight, bias, eps)


def _layer_norm_torch(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _rms_norm_triton(x, weight, eps):
    return layernorm_kernels.rms_norm_triton(x, weight, eps)


def _rms_norm_torch(x, weight, eps):
    return F.rms_norm(x, x.shape[-1:], weight, eps)


CHECKS: dict[str, KernelCheck] = {
    "attention": KernelCheck(
        make_inputs=_attention_inputs, triton=_flash_attention, torch_path=_sdpa,
        reference=_attention_reference, fallback="torch_sdpa",
    ),
    "layernorm": KernelCheck(
        make_inputs=_norm_inputs, triton=_layer_norm_triton, torch_path=_layer_norm_torch,
        reference=_layer_norm_torch, fallback="F.layer_norm",
    ),
    "rmsnorm": KernelCheck(
        make_inputs=_rms_inputs, triton=_rms_norm_triton, torch_path=_rms_norm_torch,
        reference=_rms_norm_torch, fallback="F.rms_norm",
    ),
}  # fmt: skip


def auto_picks_triton(kernel: str, x: torch.Tensor, **variant) -> bool:
    """`auto`'s choice for input x: the Triton kernel on a GPU once it has passed its check there."""
    return x.device.type in TRITON_DEVICE_TYPES and triton_validated(kernel, x.device, x.dtype, **variant)


def triton_validated(kernel: str, device: torch.device | str, dtype: torch.dtype, **variant) -> bool:
    """Whether the Triton `kernel` ("attention", "layernorm", "rmsnorm") matches its torch reference on
    `device` in `dtype`; checked on the first call per (kernel, device, dtype, variant), then remembered.

    variant: attention head_dim, group (query heads per kv head, default 1), segmented (default False);
    layernorm width, has_bias (default True); rmsnorm width. Inside torch.compile tracing or CUDA graph
    capture an unchecked kernel counts as not validated (the check cannot run there) and is checked later.
    """
    device = _with_index(torch.device(device))
    key = (kernel, device, dtype, tuple(sorted(variant.items())))
    if key in _verdicts:
        return _verdicts[key]
    if kernel not in CHECKS:
        raise ValueError(f"triton_validated: unknown kernel {kernel!r}, must be one of {', '.join(CHECKS)}")
    if _tracing_or_capturing(device):
        return False
    _verdicts[key] = _passes_check(kernel, device, dtype, variant)
    return _verdicts[key]


def _with_index(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _tracing_or_capturing(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _passes_check(kernel: str, device: torch.device, dtype: torch.dtype, variant: dict) -> bool:
    """Run the check (autograd on, inference mode and autocast off, whatever the caller's modes), log one line
    on a mismatch or an exception, and say whether the kernel passed."""
    check = CHECKS[kernel]
    what = f"the Triton {kernel} kernel ({_describe(variant)}) on {_device_name(device)} in {dtype}"
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            mismatch = _worst_mismatch(check, device, dtype, variant)
    except Exception as error:  # noqa: BLE001 - any failure (compile, launch, shapes) means not validated
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        log.warning(
            "kernels: %s failed to run (%s: %s); auto uses %s",
            what,
            type(error).__name__,
            first_line,
            check.fallback,
        )
        return False
    if mismatch is not None:
        name, error, tolerance = mismatch
        log.warning(
            "kernels: %s does not match its torch reference: %s max error %.3g vs tolerance %.3g "
            "(relative to the largest reference value); auto uses %s",
            what,
            name,
            error,
            tolerance,
            check.fallback,
        )
        return False
    log.debug("kernels: %s matches its torch reference", what)
    return True


def _describe(variant: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in sorted(variant.items()))


def _device_name(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)} ({device})" if device.type == "cuda" else str(device)


def _worst_mismatch(
    check: KernelCheck, device: torch.device, dtype: torch.dtype, variant: dict
) -> tuple[str, float, float] | None:
    """(output name, error, tolerance) of the output furthest over its tolerance; None if all are within."""
    gen = torch.Generator().manual_seed(SEED)  # a local generator: the caller's RNG state is left alone
    inputs, others = check.make_inputs(gen, **variant)
    tensors = list(inputs.values())
    grad_out = torch.randn(
        tensors[0].shape, generator=gen, dtype=torch.float64
    )  # the output has the first's shape
    want = _outputs_and_grads(check.reference, tensors, others, grad_out, device, torch.float64)
    ours = _outputs_and_grads(check.triton, tensors, others, grad_out, device, dtype)
    theirs = _outputs_and_grads(check.torch_path, tensors, others, grad_out, device, dtype)
    floor = ERROR_FLOOR.get(dtype, DEFAULT_ERROR_FLOOR)
    worst = None
    names = ["out", *(f"d{name}" for name in inputs)]
    for name, mine, torch_result, reference in zip(names, ours, theirs, want, strict=True):
        error = _relative_error(mine, reference)
        tolerance = TORCH_ERROR_FACTOR * _relative_error(torch_result, reference) + floor
        if not error <= tolerance and (worst is None or error / tolerance > worst[1] / worst[2]):
            worst = (name, error, tolerance)  # `not <=`: a NaN error fails too
    return worst


def _outputs_and_grads(
    fn: Callable,
    tensors: list[torch.Tensor],
    others: dict,
    grad_out: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """fn's output on copies of `tensors` in (device, dtype), then the gradient of <output, grad_out> w.r.t.
    each of them; all as fp64."""
    leaves = [t.to(device, dtype).requires_grad_() for t in tensors]
    others = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in others.items()}
    out = fn(*leaves, **others)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device, out.dtype))
    return [t.detach().double() for t in (out, *grads)]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale
