"""Fused GPU kernels and their torch references, behind dispatch functions the model calls."""

from kernels.attention import causal_attention
from kernels.layernorm import layer_norm

__all__ = ["causal_attention", "layer_norm"]
