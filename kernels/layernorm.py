"""LayerNorm and RMSNorm: torch references, a fused Triton kernel (forward and backward), and dispatch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels import validation  # a module reference: validation imports this module too

LAYERNORM_IMPLS = ("auto", "triton", "torch", "reference")

# One row must fit in one block: 64 KiB of input per row (16k fp32, 32k fp16/bf16, 8k fp64), the same cap
# as the Triton tutorial; wider rows would spill registers, and a looped kernel is not worth it at GPT widths.
MAX_FUSED_BYTES = 65536
# Inputs the kernels accept; fp64 only so that torch.autograd.gradcheck can test the maths.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension, statistics in fp32."""
    x32 = x.float()
    mean = x32.mean(dim=-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (x32 - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, statistics in fp32."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x32 * rstd * weight.float()).to(x.dtype)


# Forward, per row x of width N (RMSNorm: IS_RMS, mean taken as 0 and no bias):
#   mean = sum(x) / N;  var = sum((x - mean)^2) / N;  rstd = 1 / sqrt(var + eps)
#   y = (x - mean) * rstd * w + b
# mean and rstd (fp32, one per row) are kept for the backward pass.
@triton.jit
def _layer_norm_fwd_kernel(
    X,  # pointer to the input, [M, N], rows `stride` elements apart
    Y,  # pointer to the output, [M, N] contiguous, x's dtype
    W,  # pointer to the weight, [N]
    B,  # pointer to the bias, [N]; unused (any pointer) unless HAS_BIAS
    Mean,  # pointer to the per-row mean, [M] in ACC_DTYPE; unused (any pointer) if IS_RMS
    Rstd,  # pointer to the per-row 1 / std, [M] in ACC_DTYPE
    stride,  # elements between the starts of consecutive rows of X (and Y)
    N,  # row width
    eps,  # added to the variance
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 inputs
    BLOCK_SIZE: tl.constexpr,  # next power of two >= N: the whole row is one block
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 elements
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < N
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(Mean + row, mean)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(Y + row * stride + cols, y.to(Y.dtype.element_ty), mask=mask)


# Backward, per row, with xhat = (x - mean) * rstd and wdy = w * dy:
#   LayerNorm: c1 = mean(xhat * wdy), c2 = mean(wdy),  dx = (wdy - (xhat * c1 + c2)) * rstd
#   RMSNorm:   xhat = x * rstd,                         dx = (wdy - xhat * mean(xhat * wdy)) * rstd
#   dw = sum over rows of dy * xhat,  db = sum over rows of dy.
# dw/db without a lock: program p handles the contiguous rows [p * rows_per_program, (p + 1) * rows_per_program),
# sums its rows' dy * xhat (and dy) in registers and writes one partial row of DW_partial (DB_partial); the
# caller sums the [n_programs, N] partials. The tutorial's spin lock serialises programs on GROUP_SIZE rows.
@triton.jit
def _layer_norm_bwd_dx_kernel(
    X,  # pointer to the forward input, [M, N] contiguous
    DY,  # pointer to the output gradient, [M, N] contiguous
    DX,  # pointer to the input gradient written here, [M, N] contiguous, x's dtype
    W,  # pointer to the weight, [N]
    Mean,  # pointer to the per-row mean from the forward, [M]; unused (any pointer) if IS_RMS
    Rstd,  # pointer to the per-row 1 / std from the forward, [M]
    DW_partial,  # pointer to this backward's dw partials, [n_programs, N] in ACC_DTYPE
    DB_partial,  # pointer to the db partials, [n_programs, N]; unused (any pointer) unless HAS_BIAS
    M,  # number of rows
    N,  # row width (also the row stride of X, DY, DX and the partials)
    rows_per_program,  # rows each program handles (the last one may handle fewer)
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    dw = tl.zeros((BLOCK_SIZE,), dtype=ACC_DTYPE)
    db = tl.zeros((BLOCK_SIZE,), dtype=ACC_DTYPE)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    first = row_start.to(tl.int64) * N  # int64: offsets can pass 2^31 elements
    X += first
    DY += first
    DX += first
    for row in range(row_start, row_end):
        x = tl.load(X + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        X += N
        DY += N
        DX += N
    tl.store(DW_partial + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * N + cols, db, mask=mask)


def calculate_settings(n_cols: int, element_size: int) -> tuple[int, int]:
    """BLOCK_SIZE (the row, padded to a power of two) and num_warps for a row of n_cols elements."""
    block_size = triton.next_power_of_2(n_cols)
    max_block = MAX_FUSED_BYTES // element_size
    if block_size > max_block:
        raise ValueError(
            f"layer norm row width {n_cols} exceeds the fused kernel's limit of {max_block} elements "
            f"({MAX_FUSED_BYTES} bytes per row at {element_size} bytes per element)"
        )
    # As in Liger-Kernel: more warps for wider rows so each thread keeps ~8-16 elements in registers.
    if block_size >= 32768:
        num_warps = 32
    elif block_size >= 8192:
        num_warps = 16
    elif block_size >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    return block_size, num_warps


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_kernel_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"layer norm triton kernel: x.dtype={x.dtype} is not one of {_KERNEL_DTYPES}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"layer norm: {name}.shape={tuple(t.shape)}, expected ({n},) for x of width {n}")
    if not x.is_cuda and not isinstance(_layer_norm_fwd_kernel, InterpretedFunction):
        raise RuntimeError(
            f"layer norm triton kernel got a tensor on {x.device}: it needs CUDA, or TRITON_INTERPRET=1 "
            "set before kernels.layernorm is imported"
        )


def _backward_programs(x: torch.Tensor, rows: int) -> int:
    # One program per SM keeps every SM busy and the partials small (132 x N on an H100). The interpreter
    # runs programs one after another (~5-9 ms each), so use a few: enough to test uneven row chunks.
    n = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(n, rows))


class LayerNormFunction(torch.autograd.Function):
    """Fused LayerNorm / RMSNorm over the last dimension; saves x, weight, mean and rstd for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, is_rms: bool):
        _check_kernel_inputs(x, weight, bias)
        shape, n = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()  # [M, N]; copies only non-contiguous views
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        rows = x2.shape[0]
        block_size, num_warps = calculate_settings(n, x.element_size())
        stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=stats_dtype, device=x.device)
        mean = None if is_rms else torch.empty(rows, dtype=stats_dtype, device=x.device)
        if rows > 0:
            _layer_norm_fwd_kernel[(rows,)](
                x2, y, weight, bias if bias is not None else weight, rstd if is_rms else mean, rstd,
                x2.stride(0), n, eps,
                HAS_BIAS=bias is not None, IS_RMS=is_rms, ACC_DTYPE=_acc_dtype(x.dtype),
                BLOCK_SIZE=block_size, num_warps=num_warps,
            )  # fmt: skip
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.is_rms, ctx.shape = bias is not None, is_rms, shape
        ctx.block_size, ctx.num_warps = block_size, num_warps
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        n_programs = _backward_programs(x2, rows)
        rows_per_program = math.ceil(rows / n_programs) if rows else 1
        n_programs = math.ceil(rows / rows_per_program) if rows else 0  # no program without rows
        acc = rstd.dtype
        dw_partial = torch.zeros(n_programs, n, dtype=acc, device=x2.device)
        db_partial = torch.zeros(n_programs, n, dtype=acc, device=x2.device) if ctx.has_bias else None
        if rows > 0:
            _layer_norm_bwd_dx_kernel[(n_programs,)](
                x2, dy2, dx, weight, rstd if ctx.is_rms else mean, rstd,
                dw_partial, db_partial if ctx.has_bias else dw_partial, rows, n, rows_per_program,
                HAS_BIAS=ctx.has_bias, IS_RMS=ctx.is_rms, ACC_DTYPE=_acc_dtype(x2.dtype),
                BLOCK_SIZE=ctx.block_size, num_warps=ctx.num_warps,
            )  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype)
        db = db_partial.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dw, db, None, None


def layer_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """The fused Triton LayerNorm (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    return LayerNormFunction.apply(x, weight, bias, eps, False)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused Triton RMSNorm (the LayerNorm kernel without mean subtraction and bias)."""
    return LayerNormFunction.apply(x, weight, None, eps, True)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, impl: str = "auto"
) -> torch.Tensor:
    """LayerNorm over the last dimension with the implementation named by `impl`.

    auto: the Triton kernel on a GPU once it has matched F.layer_norm there (kernels.validation), else
    F.layer_norm; triton: the kernel, unchecked; torch: F.layer_norm; reference: layer_norm_reference.
    """
    if impl == "auto":
        checked = validation.auto_picks_triton("layernorm", x, width=x.shape[-1], has_bias=bias is not None)
        impl = "triton" if checked else "torch"
    if impl == "triton":
        return layer_norm_triton(x, weight, bias, eps)
    if impl == "torch":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if impl == "reference":
        return layer_norm_reference(x, weight, bias, eps)
    raise ValueError(f"kernels.layernorm={impl!r}: must be one of {', '.join(LAYERNORM_IMPLS)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension with the implementation named by `impl` (as for layer_norm)."""
    if impl == "auto":
        impl = "triton" if validation.auto_picks_triton("rmsnorm", x, width=x.shape[-1]) else "torch"
    if impl == "triton":
        return rms_norm_triton(x, weight, eps)
    if impl == "torch":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    if impl == "reference":
        return rms_norm_reference(x, weight, eps)
    raise ValueError(f"rms_norm impl={impl!r}: must be one of {', '.join(LAYERNORM_IMPLS)}")
