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

Packed sequences (several samples in one row) pass `segment_ids` (B, T): query i then attends key j only if
segment_ids[b, i] == segment_ids[b, j] (and j <= i when causal); S[i, j] = -inf elsewhere, in every block the
kernels visit, forward and backward alike. Every query sees itself, so no row is empty. Key blocks that lie
before the first key any query of a block may see are skipped (and, in backward, query blocks after the last
query any key of a block may serve); those bounds come from the runs of equal ids when a row's ids are
non-decreasing (the packed layout) and are the whole row otherwise, so any ids are correct.

No T x T matrix is ever stored: memory is O(T * head_dim) per head. Exponentials are exp2 with log2(e) folded
into the scale (one multiply fewer per score; exp2 is the hardware instruction).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.compile_check import resource_pruner

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


def _check_segments(segment_ids: torch.Tensor, q: torch.Tensor) -> None:
    batch, _, seq_len, _ = q.shape
    if segment_ids.shape != (batch, seq_len) or segment_ids.dtype.is_floating_point or segment_ids.is_complex():
        raise ValueError(f"attention: segment_ids must be an integer tensor (B, T) = {(batch, seq_len)}; got "
                         f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
    if segment_ids.device != q.device:
        raise ValueError(f"attention: segment_ids on {segment_ids.device}, q on {q.device}")


def attention_mask(seq_len: int, segment_ids: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Which keys each query may see: (T, T) causal, or (B, 1, T, T) causal and within the query's segment."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if segment_ids is None:
        return mask
    return (mask & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V, materialising the T x T matrix; q: (B, nh, T, hd), k, v: (B, nh_kv, T, hd).

    The mask is causal, and with `segment_ids` (B, T) also keeps query i from keys of another segment.
    """
    group = _check_heads(q, k, v)
    if segment_ids is not None:
        _check_segments(segment_ids, q)
    if group > 1:  # grouped-query attention: kv head j serves query heads j*group .. (j+1)*group - 1
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, T)
    scores = scores.masked_fill(~attention_mask(q.shape[-2], segment_ids, q.device), float("-inf"))
    # Softmax in fp32 so that bf16/fp16 inputs keep the precision of the fused kernels.
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention: is_causal (flash backends on CUDA), or a boolean segment mask."""
    group = _check_heads(q, k, v)
    if segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    _check_segments(segment_ids, q)
    # A (B, 1, T, T) boolean mask: CUDA takes the memory-efficient backend (flash has no masks).
    mask = attention_mask(q.shape[-2], segment_ids, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto", segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention, q: (B, nh, T, hd), k, v: (B, nh_kv, T, hd), with the implementation named by `impl`.

    segment_ids: None, or integer (B, T), the same for every head: query i attends key j iff j <= i and
    segment_ids[b, i] == segment_ids[b, j] (packed samples never see each other). Any ids work; non-decreasing
    ids along T (the packed layout) also let the Triton kernels skip other samples' blocks.
    """
    if impl == "auto":
        triton_ok = q.is_cuda and q.shape[-1] in TRITON_HEAD_DIMS and q.dtype in TRITON_DTYPES
        impl = "triton" if triton_ok else "torch_sdpa"
    if impl == "triton":
        return flash_attention(q, k, v, causal=True, segment_ids=segment_ids)
    if impl == "torch_sdpa":
        return attention_sdpa(q, k, v, segment_ids)
    if impl == "reference":
        return attention_reference(q, k, v, segment_ids)
    raise ValueError(f"kernels.attention={impl!r}: must be one of {', '.join(ATTENTION_IMPLS)}")


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Every tensor is contiguous (B, heads, T, HEAD_DIM): a row of one head is HEAD_DIM apart,
# a head T * HEAD_DIM apart; L and Delta are (B, H, T) fp32. Query head h of a program reads kv head
# h // GROUP; with bh = b * H + h and H = H_kv * GROUP, that kv head's flat index is bh // GROUP.
# With SEGMENTED, SEG (B, T) holds the segment ids and SEG_LO / SEG_HI (B, T) int32, per position, the first /
# last position that may hold the same id; a program finds its batch row b as bh // n_heads (n_heads: H in
# the query-block kernels, H_kv in the dK/dV kernel). Without SEGMENTED they are never read.
# ----------------------------------------------------------------------------------------------------------


def _autotune_configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_stages, num_warps) tiles; one tiny tile under the interpreter (no tuning there)."""
    if _INTERPRET:
        tiles = [(16, 16, 1, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in tiles]


def _tuning(kernel: str) -> dict:
    """The autotuner's early_config_prune for `kernel`: drops the tiles that spill registers or overflow shared
    memory on the running GPU, as compiled ahead of time into kernels/compiled_resources.json (see
    kernels/compile_check.py; `make compile-check` refreshes it). A GPU the table does not know prunes nothing."""
    return {"early_config_prune": resource_pruner(kernel)}


# The tiles each kernel may be tuned over, (BLOCK_M, BLOCK_N, num_stages, num_warps), kept as data so that the
# compile check (kernels/compile_check.py) compiles all of them even where the interpreter tunes nothing.
# Forward: tiles of the tutorial's sweep that win on H100 (128x64, 3-4 stages) and A100 (64-128 x 32-64, 4 warps).
FWD_TILES = [(128, 64, 3, 4), (128, 64, 4, 8), (128, 128, 3, 8), (128, 32, 4, 4), (64, 64, 3, 4), (64, 32, 4, 4)]
# dK/dV: a key block of BLOCK_N rows stays in registers while BLOCK_M query rows stream past (BLOCK_N % BLOCK_M == 0).
# 32x64 on 8 warps is the one that does not spill at head dim 128 on A100 in 16 bits, 16x32 the one in fp32.
BWD_DKDV_TILES = [(32, 128, 3, 8), (32, 128, 4, 4), (64, 128, 3, 8), (32, 64, 4, 4), (64, 64, 3, 4), (32, 64, 3, 8),
                  (16, 32, 2, 4)]
# dQ: a query block of BLOCK_M rows stays while BLOCK_N key rows stream past (BLOCK_M % BLOCK_N == 0).
# The last tile is for fp32 at head dim 128, where every other one spills on A100.
BWD_DQ_TILES = [(128, 32, 3, 8), (128, 32, 4, 4), (128, 64, 3, 8), (64, 32, 4, 4), (64, 64, 3, 4), (64, 32, 2, 8)]
_FWD_CONFIGS = _autotune_configs(FWD_TILES)
_BWD_DKDV_CONFIGS = _autotune_configs(BWD_DKDV_TILES)
_BWD_DQ_CONFIGS = _autotune_configs(BWD_DQ_TILES)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, seg_q, K, V, SEG, qk_scale, offs_m, lo, hi, T,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                    SEGMENTED: tl.constexpr, MASK: tl.constexpr):
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
            if SEGMENTED:
                keep = keep & (seg_q[:, None] == tl.load(SEG + offs_n, mask=offs_n < T, other=0)[None, :])
            # Causal: every row keeps at least one key of the first block it sees (key start_m * BLOCK_M <= its
            # row), so m_ij is finite and exp2(-inf - m_ij) = 0, never NaN. Segmented: m starts finite.
            qk = tl.where(keep, qk, float("-inf"))
        elif SEGMENTED:
            qk = tl.where(seg_q[:, None] == tl.load(SEG + offs_n)[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "SEGMENTED"],
                 prune_configs_by=_tuning("_attn_fwd_kernel"))
@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, H, T, HEAD_DIM) queries
    K,  # (B, H_kv, T, HEAD_DIM) keys
    V,  # (B, H_kv, T, HEAD_DIM) values
    Out,  # (B, H, T, HEAD_DIM) output, dtype of Q
    L,  # (B, H, T) fp32 log-sum-exp of the scaled scores per query row (natural log)
    SEG,  # (B, T) segment ids (SEGMENTED only)
    SEG_LO,  # (B, T) int32: no key before SEG_LO[i] shares query i's segment (SEGMENTED only)
    sm_scale,  # softmax scale, 1/sqrt(HEAD_DIM) by default
    T,  # sequence length
    n_heads,  # H: the batch row of program bh is bh // n_heads
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    SEGMENTED: tl.constexpr,
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

    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # log2(e): exp(x) = exp2(x * log2(e))
    if SEGMENTED:
        seg_row = (bh // n_heads).to(tl.int64) * T
        SEG = SEG + seg_row
        seg_q = tl.load(SEG + offs_m, mask=row_ok, other=0)
        # Key blocks wholly before the earliest key any row of this block may see hold only other segments.
        lo = tl.min(tl.load(SEG_LO + seg_row + offs_m, mask=row_ok, other=T), 0) // BLOCK_N * BLOCK_N
        # A row's running max starts finite: a key block all of other segments leaves it there
        # (exp2(-inf - m) = 0, alpha = 1) where -inf would give exp2(-inf + inf) = NaN. Scores never get near.
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    else:
        seg_q = offs_m  # unused
        lo = 0
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    if CAUSAL:  # off-diagonal blocks unmasked, then the diagonal block; blocks past it are never loaded
        off_band, hi = start_m, tl.minimum(start_m + BLOCK_M, T)
    else:  # whole blocks unmasked, then the ragged last block
        off_band, hi = (T // BLOCK_N) * BLOCK_N, T
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, seg_q, K + kv_off, V + kv_off, SEG, qk_scale, offs_m,
                                    lo, off_band, T, BLOCK_N, HEAD_DIM, CAUSAL, SEGMENTED, False)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, seg_q, K + kv_off, V + kv_off, SEG, qk_scale, offs_m,
                                    off_band, hi, T, BLOCK_N, HEAD_DIM, CAUSAL, SEGMENTED, True)
    if SEGMENTED:  # rows past T may have matched no key (l = 0); they are not stored, but keep them finite
        l_i = tl.where(row_ok, l_i, 1.0)
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
def _attn_bwd_dkdv_inner(dk, dv, k, v, seg_k, Q, DO, L, Delta, SEG, qk_scale, offs_n, lo, num_steps, T,
                         BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                         SEGMENTED: tl.constexpr, MASK: tl.constexpr):
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
            if SEGMENTED:
                keep = keep & (seg_k[:, None] == tl.load(SEG + offs_m, mask=row_ok, other=0)[None, :])
            pT = tl.where(keep, pT, 0.0)
        elif SEGMENTED:  # the same P as the forward: other segments' entries are exactly 0
            pT = tl.where(seg_k[:, None] == tl.load(SEG + offs_m, mask=row_ok, other=0)[None, :], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))  # (dO V^T)^T
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "GROUP", "SEGMENTED"],
                 prune_configs_by=_tuning("_attn_bwd_dkdv_kernel"))
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # inputs as in the forward
    DO,  # (B, H, T, HEAD_DIM) gradient of the output
    L, Delta,  # (B, H, T) fp32 from the forward and the preprocess
    DK, DV,  # (B, H_kv, T, HEAD_DIM) out, dtype of K
    SEG,  # (B, T) segment ids (SEGMENTED only)
    SEG_HI,  # (B, T) int32: no query after SEG_HI[j] shares key j's segment (SEGMENTED only)
    sm_scale, T,
    n_heads,  # H_kv: the batch row of program bh_kv is bh_kv // n_heads
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr,
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
    if SEGMENTED:
        seg_row = (bh_kv // n_heads).to(tl.int64) * T
        SEG = SEG + seg_row
        seg_k = tl.load(SEG + offs_n, mask=col_ok, other=0)
        # Query blocks wholly after the last query any key of this block may serve hold only other segments.
        q_hi = tl.minimum(tl.max(tl.load(SEG_HI + seg_row + offs_n, mask=col_ok, other=0), 0) + 1, T)
    else:
        seg_k = offs_n  # unused
        q_hi = T
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
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, seg_k, Qh, DOh, Lh, Deltah, SEG, qk_scale, offs_n,
                                          start_n, BLOCK_N // BLOCK_M, T, BLOCK_M, HEAD_DIM, CAUSAL, SEGMENTED,
                                          True)
            lo = start_n + BLOCK_N
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, seg_k, Qh, DOh, Lh, Deltah, SEG, qk_scale, offs_n,
                                          lo, tl.cdiv(q_hi - lo, BLOCK_M), T, BLOCK_M, HEAD_DIM, CAUSAL,
                                          SEGMENTED, False)
        else:  # only the ragged key block needs a mask (for keys past T)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, seg_k, Qh, DOh, Lh, Deltah, SEG, qk_scale, offs_n,
                                          0, tl.cdiv(q_hi, BLOCK_M), T, BLOCK_M, HEAD_DIM, CAUSAL, SEGMENTED,
                                          True)
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, seg_q, K, V, SEG, qk_scale, offs_m, lo, hi, T,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                       SEGMENTED: tl.constexpr, MASK: tl.constexpr):
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
            if SEGMENTED:
                keep = keep & (seg_q[:, None] == tl.load(SEG + offs_n, mask=offs_n < T, other=0)[None, :])
            p = tl.where(keep, p, 0.0)
        elif SEGMENTED:
            p = tl.where(seg_q[:, None] == tl.load(SEG + offs_n)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "SEGMENTED"],
                 prune_configs_by=_tuning("_attn_bwd_dq_kernel"))
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, L, Delta,  # as in the dK/dV kernel
    DQ,  # (B, H, T, HEAD_DIM) out, dtype of Q
    SEG, SEG_LO,  # as in the forward
    sm_scale, T, n_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr,
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
    if SEGMENTED:  # as in the forward
        seg_row = (bh // n_heads).to(tl.int64) * T
        SEG = SEG + seg_row
        seg_q = tl.load(SEG + offs_m, mask=row_ok, other=0)
        lo = tl.min(tl.load(SEG_LO + seg_row + offs_m, mask=row_ok, other=T), 0) // BLOCK_N * BLOCK_N
    else:
        seg_q = offs_m  # unused
        lo = 0
    if CAUSAL:
        off_band, hi = start_m, tl.minimum(start_m + BLOCK_M, T)
    else:
        off_band, hi = (T // BLOCK_N) * BLOCK_N, T
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, seg_q, K + kv_off, V + kv_off, SEG, qk_scale, offs_m,
                            lo, off_band, T, BLOCK_N, HEAD_DIM, CAUSAL, SEGMENTED, False)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, seg_q, K + kv_off, V + kv_off, SEG, qk_scale, offs_m,
                            off_band, hi, T, BLOCK_N, HEAD_DIM, CAUSAL, SEGMENTED, True)
    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# Launchers and autograd.
# ----------------------------------------------------------------------------------------------------------


class Segments(NamedTuple):
    """Segment ids as the kernels read them, and the bounds that let them skip other segments' blocks."""

    ids: torch.Tensor  # (B, T) int32 or int64, contiguous
    first: torch.Tensor  # (B, T) int32: no position before first[b, i] holds ids[b, i]
    last: torch.Tensor  # (B, T) int32: no position after last[b, i] holds ids[b, i]


def segment_layout(segment_ids: torch.Tensor, q: torch.Tensor) -> Segments:
    """Check (B, T) integer ids against q (B, H, T, D) and bound each id's positions.

    In a row of non-decreasing ids equal ids form one run, so its start and end are exact bounds; any other row
    gets the whole row (0, T - 1), which skips nothing and stays correct. A few element-wise ops, no sync.
    """
    _check_segments(segment_ids, q)
    ids = segment_ids if segment_ids.dtype in (torch.int32, torch.int64) else segment_ids.to(torch.int64)
    ids = ids.contiguous()
    batch, seq_len = ids.shape
    pos = torch.arange(seq_len, device=ids.device, dtype=torch.int32).expand(batch, seq_len)
    same_as_next = ids[:, 1:] == ids[:, :-1]  # (B, T - 1)
    edge = torch.zeros(batch, 1, dtype=torch.bool, device=ids.device)
    run_start = torch.where(torch.cat([edge, same_as_next], 1), 0, pos).cummax(1).values
    run_end = torch.where(torch.cat([same_as_next, edge], 1), seq_len - 1, pos).flip(1).cummin(1).values.flip(1)
    sorted_row = (ids[:, 1:] >= ids[:, :-1]).all(1, keepdim=True)
    first = torch.where(sorted_row, run_start, 0).to(torch.int32).contiguous()
    last = torch.where(sorted_row, run_end, seq_len - 1).to(torch.int32).contiguous()
    return Segments(ids, first, last)


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    segment_ids: torch.Tensor | Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Run the forward kernel; returns O (B, H, T, D) and the log-sum-exp L (B, H, T) fp32, natural log."""
    group = _check_triton_inputs(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, seq_len, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    seg = segment_layout(segment_ids, q) if isinstance(segment_ids, torch.Tensor) else segment_ids
    o = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_len, device=q.device, dtype=torch.float32)
    ids, first = (seg.ids, seg.first) if seg is not None else (lse, lse)  # never read without SEGMENTED
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_fwd_kernel[grid](q, k, v, o, lse, ids, first, scale, seq_len, heads,
                           GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal, SEGMENTED=seg is not None)
    return o, lse


def flash_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float, segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (dq, dk, dv) from the output gradient and what the forward saved (contiguous q, k, v, o)."""
    do = do.contiguous()
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    delta = torch.empty_like(lse)
    pre_block = 16 if _INTERPRET else 128
    _attn_bwd_preprocess[(triton.cdiv(seq_len, pre_block), batch * heads)](
        o, do, delta, seq_len, HEAD_DIM=head_dim, BLOCK_M=pre_block
    )
    seg = segments if segments is not None else Segments(lse, lse, lse)  # never read without SEGMENTED
    flags = dict(GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal, SEGMENTED=segments is not None)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kv_grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * kv_heads)  # noqa: E731
    _attn_bwd_dkdv_kernel[kv_grid](q, k, v, do, lse, delta, dk, dv, seg.ids, seg.last, scale, seq_len, kv_heads,
                                   **flags)
    q_grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_bwd_dq_kernel[q_grid](q, k, v, do, lse, delta, dq, seg.ids, seg.first, scale, seq_len, heads, **flags)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Fused attention whose backward recomputes P from the saved log-sum-exp instead of storing it."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float | None, segment_ids: torch.Tensor | None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        segments = segment_layout(segment_ids, q) if segment_ids is not None else None
        o, lse = flash_attention_forward(q, k, v, causal, scale, segments)
        ctx.save_for_backward(q, k, v, o, lse, *(segments or ()))  # segment ids and bounds: integers, no grad
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *segments = ctx.saved_tensors
        segments = Segments(*segments) if segments else None
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, segments)
        return dq, dk, dv, None, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Fused (causal) attention in Triton; q: (B, H, T, D), k, v: (B, H_kv, T, D), D in 16/32/64/128.

    segment_ids (B, T) integers, shared by all heads: query i attends key j only if their ids are equal (and
    j <= i when causal); see causal_attention.
    """
    return FlashAttentionFunction.apply(q, k, v, causal, scale, segment_ids)
