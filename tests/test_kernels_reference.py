"""The torch references in kernels/ against PyTorch's ops and a naive loop (outputs and gradients, odd shapes,
dtypes), and which implementation each kernels.* setting runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels.attention
import kernels.layernorm
from kernels import causal_attention, layer_norm
from kernels.attention import attention_reference
from kernels.layernorm import layer_norm_reference

# Compared with an fp32 result on the same (rounded) inputs; the bound is on the error relative to the
# largest output, a few units in the last place of the dtype (eps: fp16 ~1e-3, bf16 ~8e-3); observed errors are
# ~6e-4 (fp16) and ~4e-3 (bf16), so these bounds leave a margin of 5-7x.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.abs().max().item() or 1.0
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} vs scale {scale:.3g} for {dtype}"


def qkv(batch: int, heads: int, seq_len: int, head_dim: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(dtype) for _ in range(3)]


def attention_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention one query at a time in float64: query t sees keys 0..t only."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for t in range(q.shape[-2]):
        scores = q[..., t : t + 1, :] @ k[..., : t + 1, :].transpose(-2, -1) / math.sqrt(q.shape[-1])
        out[..., t : t + 1, :] = torch.softmax(scores, dim=-1) @ v[..., : t + 1, :]
    return out


@pytest.mark.parametrize("seq_len", [1, 7, 33])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_attention_reference_matches_sdpa_and_a_loop_in_fp32(seq_len, head_dim):
    q, k, v = qkv(2, 3, seq_len, head_dim)
    out = attention_reference(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(out.double(), attention_loop(q, k, v), rtol=1e-5, atol=1e-5)


def test_attention_first_position_returns_its_own_value():
    q, k, v = qkv(1, 2, 5, 16)
    torch.testing.assert_close(attention_reference(q, k, v)[..., 0, :], v[..., 0, :])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [7, 33])
def test_attention_reference_in_half_precision(dtype, seq_len):
    q, k, v = qkv(2, 2, seq_len, 32, dtype=dtype)
    expected = attention_loop(q, k, v)  # exact maths on the rounded inputs
    out = attention_reference(q, k, v)
    assert out.dtype == dtype
    assert_close_to(out, expected, dtype)
    assert_close_to(F.scaled_dot_product_attention(q, k, v, is_causal=True), expected, dtype)


@pytest.mark.parametrize("seq_len", [1, 7, 33])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_attention_reference_gradients_match_sdpa(seq_len, head_dim):
    grad_out = torch.randn(2, 3, seq_len, head_dim, generator=torch.Generator().manual_seed(9))
    grads = []
    for impl in ("reference", "torch_sdpa"):
        inputs = [t.requires_grad_() for t in qkv(2, 3, seq_len, head_dim, seed=1)]
        causal_attention(*inputs, impl=impl).backward(grad_out)
        grads.append([t.grad for t in inputs])
    for ref, sdpa, name in zip(*grads, "qkv", strict=True):
        torch.testing.assert_close(ref, sdpa, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def layer_norm_inputs(rows: int, width: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # An offset mean checks that the variance is taken around the mean, not around zero.
    x = (torch.randn(rows, width, generator=gen) * 2 + 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(width, generator=gen)).to(dtype)
    bias = (0.1 * torch.randn(width, generator=gen)).to(dtype)
    grad_out = torch.randn(rows, width, generator=gen).to(dtype)
    return x, weight, bias, grad_out


def layer_norm_grads(fn, x, weight, bias, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = fn(*inputs)
    out.backward(grad_out)
    return out, [t.grad for t in inputs]


@pytest.mark.parametrize("width", [2, 7, 32, 33, 129])
def test_layer_norm_reference_matches_torch_in_fp32(width):
    x, weight, bias, grad_out = layer_norm_inputs(5, width, torch.float32)
    out, grads = layer_norm_grads(lambda *a: layer_norm_reference(*a, 1e-5), x, weight, bias, grad_out)
    expected, expected_grads = layer_norm_grads(
        lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-5), x, weight, bias, grad_out
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads, expected_grads, ("x", "weight", "bias"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_layer_norm_reference_of_width_one_is_the_bias():
    # x - mean is exactly 0; F.layer_norm's dx is off by ~1.5e-5 here, the reference's is exactly 0.
    x, weight, bias, grad_out = layer_norm_inputs(5, 1, torch.float32)
    out, (dx, _, dbias) = layer_norm_grads(
        lambda *a: layer_norm_reference(*a, 1e-5), x, weight, bias, grad_out
    )
    torch.testing.assert_close(out, bias.expand(5, 1), rtol=0, atol=0)
    assert torch.all(dx == 0)
    torch.testing.assert_close(dbias, grad_out.sum(0))


def test_layer_norm_reference_without_bias_and_on_3d_input():
    x, weight, _, _ = layer_norm_inputs(6, 16, torch.float32)
    x = x.view(2, 3, 16)
    torch.testing.assert_close(
        layer_norm_reference(x, weight, None, 1e-5), F.layer_norm(x, (16,), weight, None, 1e-5)
    )


@pytest.mark.parametrize("width", [7, 33, 129])
def test_layer_norm_reference_in_bf16_keeps_fp32_statistics(width):
    x, weight, bias, grad_out = layer_norm_inputs(6, width, torch.bfloat16)
    # Golden: fp32 arithmetic on the same bf16-rounded numbers.
    expected, expected_grads = layer_norm_grads(
        lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-5),
        x.float(),
        weight.float(),
        bias.float(),
        grad_out.float(),
    )
    for fn in (
        lambda *a: layer_norm_reference(*a, 1e-5),
        lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-5),
    ):
        out, grads = layer_norm_grads(fn, x, weight, bias, grad_out)
        assert out.dtype == torch.bfloat16
        assert_close_to(out, expected, torch.bfloat16)
        for got, want in zip(grads, expected_grads, strict=True):
            assert got.dtype == torch.bfloat16
            assert_close_to(got, want, torch.bfloat16)


def spy_on(monkeypatch, owner, names: list[str]) -> list[str]:
    """Wrap owner.<name> for each name so that a call runs it and appends its name to the returned list."""
    calls: list[str] = []
    for name in names:
        real = getattr(owner, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    return calls


# Which function each kernels.attention setting must run for CPU tensors: `auto` takes PyTorch's SDPA there
# (the Triton kernel only on CUDA); `triton` runs the kernel even on the CPU (in Triton's interpreter).
ATTENTION_ON_CPU = {"auto": "attention_sdpa", "triton": "flash_attention", "torch_sdpa": "attention_sdpa",
                    "reference": "attention_reference"}
# The same for kernels.layernorm: "layer_norm" is torch.nn.functional.layer_norm.
LAYERNORM_ON_CPU = {"auto": "layer_norm", "triton": "layer_norm_triton", "torch": "layer_norm",
                    "reference": "layer_norm_reference"}


@pytest.mark.parametrize("impl", list(ATTENTION_ON_CPU))
def test_attention_dispatch_runs_the_named_implementation(impl, monkeypatch):
    calls = spy_on(monkeypatch, kernels.attention, sorted(set(ATTENTION_ON_CPU.values())))
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 9, 16))
    out = causal_attention(q, k, v, impl)
    assert calls == [ATTENTION_ON_CPU[impl]]
    is_kernel = type(out.grad_fn).__name__ == "FlashAttentionFunctionBackward"
    assert is_kernel == (impl == "triton"), f"{impl}: grad_fn {type(out.grad_fn).__name__}"
    torch.testing.assert_close(out, attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", list(LAYERNORM_ON_CPU))
def test_layernorm_dispatch_runs_the_named_implementation(impl, monkeypatch):
    calls = spy_on(monkeypatch, kernels.layernorm, ["layer_norm_triton", "layer_norm_reference"])
    calls_to_torch = spy_on(monkeypatch, kernels.layernorm.F, ["layer_norm"])
    x, weight, bias, _ = layer_norm_inputs(3, 10, torch.float32)
    out = layer_norm(x.requires_grad_(), weight, bias, 1e-5, impl)
    assert calls + calls_to_torch == [LAYERNORM_ON_CPU[impl]]
    is_kernel = type(out.grad_fn).__name__ == "LayerNormFunctionBackward"
    assert is_kernel == (impl == "triton"), f"{impl}: grad_fn {type(out.grad_fn).__name__}"
    torch.testing.assert_close(out, layer_norm_reference(x, weight, bias, 1e-5), rtol=1e-5, atol=1e-5)


def test_unknown_implementations_raise_naming_the_config_key():
    q, k, v = qkv(1, 1, 3, 16)
    with pytest.raises(ValueError, match=r"kernels\.attention='flash3'"):
        causal_attention(q, k, v, "flash3")
    x, weight, bias, _ = layer_norm_inputs(2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"kernels\.layernorm='apex'"):
        layer_norm(x, weight, bias, 1e-5, "apex")
