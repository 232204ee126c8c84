"""Causal self-attention: a torch reference, PyTorch's SDPA and a fused Triton flash attention.

The Triton kernels follow the Flash Attention 2 algorithm as the Triton tutorial 06-fused-attention writes it.
Per (batch, head), with S = scale * Q K^T (causal: S[i, j] = -inf for j > i), P = softmax(S), O = P V:

  forward    one program per query block walks the key blocks up to the diagonal keeping, per row, the running
             max m and sum l of exp(S - m) and an fp32 accumulator of P V (the online softmax); it writes O
             and the log-sum-exp L = m + log(l), so backward can rebuild P = exp(S - L) block by block.
  backward   Delta = rowsum(dO * O);  dV = P^T dO;  dP = dO V^T;  dS = P * (dP - Delta);
             dQ = scale * dS K;  dK = scale * dS^T Q.
             One kernel owns a key block (dK, dV; loops over query blocks from the diagonal on), another a
             query block (dQ; loops over key blocks up to the diagonal): each output has a single writer, so
             there are no atomics, at the price of computing P and dP twice.

No T x T matrix is ever stored: memory is O(T * head_dim) per head. Exponentials are exp2 with log2(e) folded
into the scale (one multiply fewer per score; exp2 is the hardware instruction).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ATTENTION_IMPLS = ("auto", "triton", "torch_sdpa", "reference")
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Read when the kernels are defined, as Triton itself does; conftest.py sets it on machines without a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate (B, H, T, D) / (B, H_kv, T, D) shapes and return the group size H // H_kv."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: q {tuple(q.shape)} must be (B, H, T, D), k and v (B, H_kv, T, D); "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention: query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    return q.shape[1] // k.shape[1]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + causal mask) V, materialising the T x T matrix; q: (B, nh, T, hd), k, v: (B, nh_kv, T, hd)."""
    group = _check_heads(q, k, v)
    if group > 1:  # grouped-query attention: kv head j serves query heads j*group .. (j+1)*group - 1
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    seq_len = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, T)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax in fp32 so that bf16/fp16 inputs keep the precision of the fused kernels.
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention (flash / memory-efficient backends on CUDA)."""
    group = _check_heads(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Causal attention, q: (B, nh, T, hd), k, v: (B, nh_kv, T, hd), with the implementation named by `impl`."""
    if impl == "auto":
        triton_ok = q.is_cuda and q.shape[-1] in TRITON_HEAD_DIMS and q.dtype in TRITON_DTYPES
        impl = "triton" if triton_ok else "torch_sdpa"
    if impl == "triton":
        return flash_attention(q, k, v, causal=True)
    if impl == "torch_sdpa":
        return attention_sdpa(q, k, v)
    if impl == "reference":
        return attention_reference(q, k, v)
    raise ValueError(f"kernels.attention={impl!r}: must be one of {', '.join(ATTENTION_IMPLS)}")


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Every tensor is contiguous (B, heads, T, HEAD_DIM): a row of one head is HEAD_DIM apart,
# a head T * HEAD_DIM apart; L and Delta are (B, H, T) fp32. Query head h of a program reads kv head
# h // GROUP; with bh = b * H + h and H = H_kv * GROUP, that kv head's flat index is bh // GROUP.
# ----------------------------------------------------------------------------------------------------------


def _autotune_configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_stages, num_warps) tiles; one tiny tile under the interpreter (no tuning there)."""
    if _INTERPRET:
        tiles = [(16, 16, 1, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in tiles]


# Tiles of the tutorial's sweep that win on H100 (128x64, 3-4 stages) and A100 (64-128 x 32-64, 4 warps);
# tiles that overflow shared memory on a device (e.g. 128x128 at D=128 on A100) are skipped by the tuner.
_FWD_CONFIGS = _autotune_configs(
    [(128, 64, 3, 4), (128, 64, 4, 8), (128, 128, 3, 8), (128, 32, 4, 4), (64, 64, 3, 4), (64, 32, 4, 4)]
)
# dK/dV: a key block of BLOCK_N rows stays in registers while BLOCK_M query rows stream past (BLOCK_N % BLOCK_M == 0).
_BWD_DKDV_CONFIGS = _autotune_configs([(32, 128, 3, 8), (32, 128, 4, 4), (64, 128, 3, 8), (32, 64, 4, 4), (64, 64, 3, 4)])
# dQ: a query block of BLOCK_M rows stays while BLOCK_N key rows stream past (BLOCK_M % BLOCK_N == 0).
_BWD_DQ_CONFIGS = _autotune_configs([(128, 32, 3, 8), (128, 32, 4, 4), (128, 64, 3, 8), (64, 32, 4, 4), (64, 64, 3, 4)])


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, qk_scale, offs_m, lo, hi, T,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """Fold key blocks [lo, hi) into the online softmax; MASK: the diagonal / last block, masked per element."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[None, :] * HEAD_DIM + offs_d[:, None]  # K^T tile (HEAD_DIM, BLOCK_N)
        v_ptrs = V + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        if MASK:
            kT = tl.load(k_ptrs, mask=offs_n[None, :] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:  # blocks before the diagonal lie wholly inside the sequence: no masks in the hot loop
            kT = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, kT) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            # Every row keeps at least one key of the first block it sees (key start_m * BLOCK_M <= its row),
            # so m_ij is finite and exp2(-inf - m_ij) = 0, never NaN.
            qk = tl.where(keep, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, H, T, HEAD_DIM) queries
    K,  # (B, H_kv, T, HEAD_DIM) keys
    V,  # (B, H_kv, T, HEAD_DIM) values
    Out,  # (B, H, T, HEAD_DIM) output, dtype of Q
    L,  # (B, H, T) fp32 log-sum-exp of the scaled scores per query row (natural log)
    sm_scale,  # softmax scale, 1/sqrt(HEAD_DIM) by default
    T,  # sequence length
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the diagonal starts on a key-block boundary
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    q_off = bh.to(tl.int64) * T * HEAD_DIM
    kv_off = (bh // GROUP).to(tl.int64) * T * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + q_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # log2(e): exp(x) = exp2(x * log2(e))
    if CAUSAL:  # off-diagonal blocks unmasked, then the diagonal block; blocks past it are never loaded
        off_band, hi = start_m, tl.minimum(start_m + BLOCK_M, T)
    else:  # whole blocks unmasked, then the ragged last block
        off_band, hi = (T // BLOCK_N) * BLOCK_N, T
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K + kv_off, V + kv_off, qk_scale, offs_m, 0, off_band, T,
                                    BLOCK_N, HEAD_DIM, CAUSAL, False)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K + kv_off, V + kv_off, qk_scale, offs_m, off_band, hi, T,
                                    BLOCK_N, HEAD_DIM, CAUSAL, True)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log, as torch.logsumexp
    tl.store(L + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
    tl.store(Out + q_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _attn_bwd_preprocess(
    Out,  # (B, H, T, HEAD_DIM) forward output
    DO,  # (B, H, T, HEAD_DIM) gradient of the output
    Delta,  # (B, H, T) fp32 out: rowsum(O * dO), the softmax-backward correction
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    row_ok = offs_m < T
    o = tl.load(Out + ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + bh * T + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, L, Delta, qk_scale, offs_n, lo, num_steps, T,
                         BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """Accumulate dK, dV of one key block over `num_steps` query blocks from `lo`; works on transposed tiles."""
    offs_d = tl.arange(0, HEAD_DIM)
    for step in range(num_steps):
        offs_m = lo + step * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        # Rows past T load zeros for q and dO, so they add exactly 0 to dV = P^T dO and dK = dS^T Q.
        q = tl.load(Q + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(L + offs_m, mask=row_ok, other=0.0) * 1.44269504
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
        pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])  # (BLOCK_N, BLOCK_M) = P^T
        if MASK:
            keep = offs_n[:, None] < T
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))  # (dO V^T)^T
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "GROUP"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # inputs as in the forward
    DO,  # (B, H, T, HEAD_DIM) gradient of the output
    L, Delta,  # (B, H, T) fp32 from the forward and the preprocess
    DK, DV,  # (B, H_kv, T, HEAD_DIM) out, dtype of K
    sm_scale, T,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_N % BLOCK_M == 0)  # the diagonal spans whole query blocks
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)
    kv_off = bh_kv.to(tl.int64) * T * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ptrs = kv_off + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    col_ok = offs_n < T
    k = tl.load(K + kv_ptrs, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_ptrs, mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504
    # GQA: a kv head's gradient is the sum over the query heads of its group. Looping over them here keeps
    # the sum in registers, writes dK/dV once in their own dtype and needs no (B, H, T, D) fp32 buffers
    # nor a torch reduction afterwards; the cost is GROUP x fewer programs, which at training shapes
    # (B * H_kv * T / BLOCK_N in the hundreds) still fill the GPU.
    for g in range(GROUP):
        bh = bh_kv * GROUP + g
        q_off = bh.to(tl.int64) * T * HEAD_DIM
        Qh, DOh = Q + q_off, DO + q_off
        Lh, Deltah = L + bh.to(tl.int64) * T, Delta + bh.to(tl.int64) * T
        if CAUSAL:  # queries before start_n never see this block; the diagonal block needs the mask
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, Lh, Deltah, qk_scale, offs_n, start_n,
                                          BLOCK_N // BLOCK_M, T, BLOCK_M, HEAD_DIM, CAUSAL, True)
            lo = start_n + BLOCK_N
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, Lh, Deltah, qk_scale, offs_n, lo,
                                          tl.cdiv(T - lo, BLOCK_M), T, BLOCK_M, HEAD_DIM, CAUSAL, False)
        else:  # only the ragged key block needs a mask (for keys past T)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, Lh, Deltah, qk_scale, offs_n, 0,
                                          tl.cdiv(T, BLOCK_M), T, BLOCK_M, HEAD_DIM, CAUSAL, True)
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, qk_scale, offs_m, lo, hi, T,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        v_ptrs = V + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        if MASK:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, L, Delta,  # as in the dK/dV kernel
    DQ,  # (B, H, T, HEAD_DIM) out, dtype of Q
    sm_scale, T,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    q_off = bh.to(tl.int64) * T * HEAD_DIM
    kv_off = (bh // GROUP).to(tl.int64) * T * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    row_ok = offs_m < T
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(L + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0) * 1.44269504
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504
    if CAUSAL:
        off_band, hi = start_m, tl.minimum(start_m + BLOCK_M, T)
    else:
        off_band, hi = (T // BLOCK_N) * BLOCK_N, T
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K + kv_off, V + kv_off, qk_scale, offs_m, 0, off_band, T,
                            BLOCK_N, HEAD_DIM, CAUSAL, False)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K + kv_off, V + kv_off, qk_scale, offs_m, off_band, hi, T,
                            BLOCK_N, HEAD_DIM, CAUSAL, True)
    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# Launchers and autograd.
# ----------------------------------------------------------------------------------------------------------


def _check_triton_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    group = _check_heads(q, k, v)
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim {q.shape[-1]} not supported, must be one of {TRITON_HEAD_DIMS}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in TRITON_DTYPES:
        raise ValueError(f"flash_attention: dtypes {q.dtype}, {k.dtype}, {v.dtype} must match and be one of "
                         f"{TRITON_DTYPES}")
    if not q.is_cuda and not _INTERPRET:
        raise ValueError(f"flash_attention: tensors on {q.device} need CUDA, or TRITON_INTERPRET=1 set before "
                         "kernels is imported")
    return group


def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel; returns O (B, H, T, D) and the log-sum-exp L (B, H, T) fp32, natural log."""
    group = _check_triton_inputs(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, seq_len, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    o = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_len, device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_fwd_kernel[grid](q, k, v, o, lse, scale, seq_len, GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal)
    return o, lse


def flash_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (dq, dk, dv) from the output gradient and what the forward saved (contiguous q, k, v, o)."""
    do = do.contiguous()
    batch, heads, seq_len, head_dim = q.shape
    group = heads // k.shape[1]
    delta = torch.empty_like(lse)
    pre_block = 16 if _INTERPRET else 128
    _attn_bwd_preprocess[(triton.cdiv(seq_len, pre_block), batch * heads)](
        o, do, delta, seq_len, HEAD_DIM=head_dim, BLOCK_M=pre_block
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kv_grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * k.shape[1])  # noqa: E731
    _attn_bwd_dkdv_kernel[kv_grid](q, k, v, do, lse, delta, dk, dv, scale, seq_len,
                                   GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal)
    q_grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_bwd_dq_kernel[q_grid](q, k, v, do, lse, delta, dq, scale, seq_len,
                                GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Fused attention whose backward recomputes P from the saved log-sum-exp instead of storing it."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float | None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        o, lse = flash_attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Fused (causal) attention in Triton; q: (B, H, T, D), k, v: (B, H_kv, T, D), D in 16/32/64/128."""
    return FlashAttentionFunction.apply(q, k, v, causal, scale)
