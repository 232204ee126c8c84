"""The Triton LayerNorm/RMSNorm kernels against the torch references: outputs and gradients, odd shapes, dtypes.

Without a GPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), ~5-9 ms per
program, so shapes stay tiny: the forward launches one program per row, the backward at most four.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.layernorm import (
    MAX_FUSED_BYTES,
    LayerNormFunction,
    layer_norm,
    layer_norm_reference,
    layer_norm_triton,
    rms_norm,
    rms_norm_reference,
    rms_norm_triton,
)

EPS = 1e-5
# Bound on the error relative to the largest value of the fp32 golden, which is computed on the same
# (rounded) inputs: a few units in the last place of the dtype. Observed at these shapes: fp32 ~1e-7,
# fp16 ~5e-4, bf16 ~4e-3.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 loads/stores work in the 3.9 interpreter
WIDTHS = [1, 7, 32, 33, 129, 1000]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    scale = expected.abs().max().item() or 1.0
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, (
        f"{name}: max error {error:.3g} vs scale {scale:.3g} for {dtype}"
    )


def norm_inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    width = shape[-1]
    # An offset mean checks that the variance is taken around the mean, not around zero.
    x = (torch.randn(shape, generator=gen) * 2 + 3).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(width, generator=gen)).to(device, dtype)
    bias = (0.1 * torch.randn(width, generator=gen)).to(device, dtype)
    grad_out = torch.randn(shape, generator=gen).to(device, dtype)
    return x, weight, bias, grad_out


def run_with_grads(fn, grad_out, *inputs):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> with respect to each input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [t.grad for t in leaves]


def check_against_golden(fn, golden_fn, grad_out, inputs, dtype) -> None:
    """fn on `inputs` vs golden_fn on fp32 copies of the same rounded numbers: output and every gradient."""
    out, grads = run_with_grads(fn, grad_out, *inputs)
    expected, expected_grads = run_with_grads(golden_fn, grad_out.float(), *(t.float() for t in inputs))
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_close_to(out, expected, dtype, "out")
    for got, want, name in zip(grads, expected_grads, ("dx", "dweight", "dbias"), strict=False):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close_to(got, want, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
def test_layer_norm_matches_reference(width, dtype):
    rows = 1 + width % 7  # 1..7 rows: backward chunks of uneven length over up to four programs
    x, weight, bias, grad_out = norm_inputs((rows, width), dtype)
    check_against_golden(
        lambda *a: layer_norm_triton(*a, EPS), lambda *a: layer_norm_reference(*a, EPS), grad_out,
        (x, weight, bias), dtype,
    )  # fmt: skip


@pytest.mark.parametrize("width", [33, 1000])
def test_layer_norm_matches_torch_in_fp32(width):
    x, weight, bias, grad_out = norm_inputs((5, width), torch.float32)
    out, grads = run_with_grads(lambda *a: layer_norm_triton(*a, EPS), grad_out, x, weight, bias)
    expected, expected_grads = run_with_grads(
        lambda x, w, b: F.layer_norm(x, (width,), w, b, EPS), grad_out, x, weight, bias
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads, expected_grads, ("x", "weight", "bias"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_layer_norm_of_width_one_is_the_bias_with_zero_dx():
    x, weight, bias, grad_out = norm_inputs((3, 1), torch.float32)
    out, (dx, _, dbias) = run_with_grads(lambda *a: layer_norm_triton(*a, EPS), grad_out, x, weight, bias)
    torch.testing.assert_close(out, bias.expand(3, 1), rtol=0, atol=0)
    assert torch.all(dx == 0)
    torch.testing.assert_close(dbias, grad_out.sum(0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# Not width 1: there y = w * sign(x) and dx ~ w * dy * eps / |x|^3 is all rounding noise, in the golden too.
@pytest.mark.parametrize("width", [2, 33, 1000])
def test_rms_norm_matches_reference(width, dtype):
    rows = 1 + width % 7
    x, weight, _, grad_out = norm_inputs((rows, width), dtype)
    check_against_golden(
        lambda *a: rms_norm_triton(*a, EPS),
        lambda *a: rms_norm_reference(*a, EPS),
        grad_out,
        (x, weight),
        dtype,
    )


def test_rms_norm_reference_matches_torch():
    x, weight, _, _ = norm_inputs((4, 33), torch.float32)
    torch.testing.assert_close(rms_norm_reference(x, weight, EPS), F.rms_norm(x, (33,), weight, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_layer_norm_without_bias(dtype):
    x, weight, _, grad_out = norm_inputs((3, 33), dtype)
    check_against_golden(
        lambda x, w: layer_norm_triton(x, w, None, EPS), lambda x, w: layer_norm_reference(x, w, None, EPS),
        grad_out, (x, weight), dtype,
    )  # fmt: skip


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_non_contiguous_3d_input_and_grad(norm):
    if norm == "layer":
        fn, golden = (lambda *a: layer_norm_triton(*a, EPS)), (lambda *a: layer_norm_reference(*a, EPS))
    else:
        fn, golden = (lambda *a: rms_norm_triton(*a, EPS)), (lambda *a: rms_norm_reference(*a, EPS))
    # (3, 2, 33) -> (2, 3, 33): rows are not evenly spaced; (2, 33, 3) -> (2, 3, 33): the last dim is strided.
    x_rows = (torch.randn(3, 2, 33) * 2 + 3).transpose(0, 1)
    x_cols = (torch.randn(2, 33, 3) * 2 + 3).transpose(1, 2)
    grad_out = torch.randn(2, 33, 3).transpose(1, 2)
    weight, bias = 1 + 0.1 * torch.randn(33), 0.1 * torch.randn(33)
    for x in (x_rows, x_cols):
        assert not x.is_contiguous()
        inputs = (x, weight, bias) if norm == "layer" else (x, weight)
        check_against_golden(fn, golden, grad_out, inputs, torch.float32)


# gradcheck needs float64 to resolve its finite differences, so the kernels accept fp64 and then keep their
# statistics and partial sums in fp64 too (ACC_DTYPE); this checks the backward maths itself, independent
# of any reference.
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer", "rms"])
def test_gradcheck_in_float64(is_rms):
    x, weight, bias, _ = norm_inputs((3, 6), torch.float64)
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    if is_rms:
        inputs[2] = None
    assert torch.autograd.gradcheck(
        lambda x, w, b: LayerNormFunction.apply(x, w, b, EPS, is_rms), inputs, eps=1e-6, atol=1e-5, rtol=1e-4
    )


def test_width_at_the_cap_runs():
    # 64 KiB per row: 16384 fp32 columns (the widest GPT width we target).
    x, weight, bias, grad_out = norm_inputs((2, 16384), torch.float32)
    check_against_golden(
        lambda *a: layer_norm_triton(*a, EPS), lambda *a: layer_norm_reference(*a, EPS), grad_out,
        (x, weight, bias), torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_widest_16_bit_row_matches_reference(dtype):
    # The widest row the kernel claims in 16 bits: MAX_FUSED_BYTES of input, 32768 columns of 2 bytes.
    # Its sum (32768 values around 3, ~1e5) is past fp16's largest number (65504): statistics must be fp32.
    width = MAX_FUSED_BYTES // dtype.itemsize
    x, weight, bias, grad_out = norm_inputs((2, width), dtype)
    check_against_golden(
        lambda *a: layer_norm_triton(*a, EPS), lambda *a: layer_norm_reference(*a, EPS), grad_out,
        (x, weight, bias), dtype,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "width", "cap"), [(torch.float32, 16385, 16384), (torch.float16, 32769, 32768)]
)
def test_width_over_the_cap_raises_naming_it(dtype, width, cap):
    x, weight, bias, _ = norm_inputs((1, width), dtype)
    with pytest.raises(ValueError, match=rf"row width {width} exceeds .* limit of {cap} elements"):
        layer_norm_triton(x, weight, bias, EPS)


def test_bad_inputs_raise_naming_them():
    x, weight, bias, _ = norm_inputs((2, 8), torch.float32)
    with pytest.raises(ValueError, match=r"x\.dtype=torch\.int32"):
        layer_norm_triton(x.int(), weight, bias, EPS)
    with pytest.raises(ValueError, match=r"weight\.shape=\(7,\)"):
        layer_norm_triton(x, weight[:7], bias, EPS)


def test_dispatch_routes_triton_to_the_kernel_and_auto_on_cpu_to_torch():
    x, weight, bias, _ = norm_inputs((2, 10), torch.float32)
    x.requires_grad_()
    expected = F.layer_norm(x, (10,), weight, bias, EPS)
    triton_out = layer_norm(x, weight, bias, EPS, "triton")
    assert type(triton_out.grad_fn).__name__ == "LayerNormFunctionBackward"
    auto_out = layer_norm(x, weight, bias, EPS, "auto")
    assert type(auto_out.grad_fn).__name__ == type(expected.grad_fn).__name__  # NativeLayerNormBackward0
    for out in (triton_out, auto_out, layer_norm(x, weight, bias, EPS, "reference")):
        torch.testing.assert_close(out, expected)

    rms_expected = F.rms_norm(x, (10,), weight, EPS)
    rms_triton = rms_norm(x, weight, EPS, "triton")
    assert type(rms_triton.grad_fn).__name__ == "LayerNormFunctionBackward"
    assert type(rms_norm(x, weight, EPS, "auto").grad_fn).__name__ != "LayerNormFunctionBackward"
    for out in (rms_triton, rms_norm(x, weight, EPS, "auto"), rms_norm(x, weight, EPS, "reference")):
        torch.testing.assert_close(out, rms_expected)
    with pytest.raises(ValueError, match=r"kernels\.layernorm='apex'"):
        layer_norm(x, weight, bias, EPS, "apex")
    with pytest.raises(ValueError, match=r"rms_norm impl='apex'"):
        rms_norm(x, weight, EPS, "apex")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_training_shapes_match_torch_on_gpu(dtype, is_rms):
    x, weight, bias, grad_out = norm_inputs((4096, 8192), dtype, device="cuda")
    if is_rms:
        fn, golden, inputs = rms_norm_triton, (lambda x, w: F.rms_norm(x, (8192,), w, EPS)), (x, weight)
    else:
        fn, golden, inputs = (
            layer_norm_triton,
            (lambda x, w, b: F.layer_norm(x, (8192,), w, b, EPS)),
            (x, weight, bias),
        )
    check_against_golden(lambda *a: fn(*a, EPS), golden, grad_out, inputs, dtype)


@pytest.mark.gpu
@needs_cuda
def test_auto_on_cuda_routes_to_the_kernel():
    x, weight, bias, _ = norm_inputs((4, 256), torch.float16, device="cuda")
    out = layer_norm(x.requires_grad_(), weight, bias, EPS, "auto")
    assert type(out.grad_fn).__name__ == "LayerNormFunctionBackward"
    torch.testing.assert_close(out, F.layer_norm(x, (256,), weight, bias, EPS), rtol=4e-3, atol=4e-3)
