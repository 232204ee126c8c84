"""Causal self-attention: a torch reference and dispatch to the fastest implementation available."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ATTENTION_IMPLS = ("auto", "torch_sdpa", "reference")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + causal mask) V, materialising the T x T matrix; q, k, v: (B, nh, T, hd)."""
    seq_len = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, T)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax in fp32 so that bf16/fp16 inputs keep the precision of the fused kernels.
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention (flash / memory-efficient backends on CUDA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Causal attention over (B, nh, T, hd) tensors with the implementation named by `impl`."""
    if impl in ("auto", "torch_sdpa"):
        return attention_sdpa(q, k, v)
    if impl == "reference":
        return attention_reference(q, k, v)
    raise ValueError(f"kernels.attention={impl!r}: must be one of {', '.join(ATTENTION_IMPLS)}")
