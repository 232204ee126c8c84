"""kernels.validation: the Triton kernels pass their check (run here under Triton's interpreter), planted
wrong variants and kernels that raise do not (one warning line each), and `auto` then takes the torch path.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import kernels.attention as attention_kernels
import kernels.layernorm as layernorm_kernels
from kernels import validation
from kernels.layernorm import layer_norm, rms_norm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Every test starts with no kernel checked yet in this process."""
    monkeypatch.setattr(validation, "_verdicts", {})


def plant(monkeypatch, kernel: str, triton_fn) -> None:
    """Check `triton_fn` in place of the real Triton function of `kernel`."""
    check = dataclasses.replace(validation.CHECKS[kernel], triton=triton_fn)
    monkeypatch.setitem(validation.CHECKS, kernel, check)


def warnings_logged(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == validation.__name__ and r.levelno >= logging.WARNING
    ]


class Counted:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def gradient_off_by(fn, factor: float):
    """fn with the same forward and every input gradient multiplied by `factor`."""

    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        return out + (factor - 1.0) * (out - out.detach())

    return wrong


@pytest.mark.parametrize("dtype, variant", [
    (torch.float32, dict(head_dim=16)),
    (torch.float16, dict(head_dim=16, group=2, segmented=True)),
])  # fmt: skip
def test_attention_kernel_passes_its_check(caplog, dtype, variant):
    assert validation.triton_validated("attention", "cpu", dtype, **variant)
    assert warnings_logged(caplog) == []


@pytest.mark.parametrize("kernel, dtype, variant", [
    ("layernorm", torch.float32, dict(width=33)),
    ("layernorm", torch.bfloat16, dict(width=64, has_bias=False)),
    ("rmsnorm", torch.float16, dict(width=32)),
])  # fmt: skip
def test_norm_kernels_pass_their_check(caplog, kernel, dtype, variant):
    assert validation.triton_validated(kernel, "cpu", dtype, **variant)
    assert warnings_logged(caplog) == []


def test_attention_with_a_wrong_softmax_scale_is_rejected_in_one_line(monkeypatch, caplog):
    def scale_5_percent_off(q, k, v, segment_ids=None):
        return attention_kernels.flash_attention(
            q, k, v, scale=1.05 / math.sqrt(q.shape[-1]), segment_ids=segment_ids
        )

    wrong = Counted(scale_5_percent_off)
    plant(monkeypatch, "attention", wrong)
    assert not validation.triton_validated("attention", "cpu", torch.float32, head_dim=16)
    assert not validation.triton_validated("attention", torch.device("cpu"), torch.float32, head_dim=16)
    assert wrong.calls == 1  # once per process: the second call reuses the verdict
    [line] = warnings_logged(caplog)
    assert "attention kernel (head_dim=16) on cpu in torch.float32 does not match" in line
    assert "max error" in line and "vs tolerance" in line and "auto uses torch_sdpa" in line
    assert "\n" not in line


def test_layer_norm_with_a_wrong_gradient_is_rejected(monkeypatch, caplog):
    plant(monkeypatch, "layernorm", gradient_off_by(layernorm_kernels.layer_norm_triton, 1.05))
    assert not validation.triton_validated("layernorm", "cpu", torch.float32, width=32)
    [line] = warnings_logged(caplog)
    assert "layernorm kernel (width=32)" in line and "auto uses F.layer_norm" in line
    assert "out max error" not in line  # the forward is right: a gradient is what fails


def test_a_kernel_that_raises_is_rejected_in_one_line(monkeypatch, caplog):
    def fails_to_compile(*args, **kwargs):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_120\nptxas fatal: ...")

    plant(monkeypatch, "rmsnorm", fails_to_compile)
    assert not validation.triton_validated("rmsnorm", "cpu", torch.bfloat16, width=32)
    [line] = warnings_logged(caplog)
    assert "rmsnorm kernel (width=32) on cpu in torch.bfloat16 failed to run" in line
    assert "(RuntimeError: PTX .version 8.7 does not support .target sm_120)" in line
    assert "\n" not in line and "Traceback" not in line


def test_each_variant_is_checked_once(monkeypatch):
    kernel = Counted(layernorm_kernels.layer_norm_triton)
    plant(monkeypatch, "layernorm", kernel)
    for _ in range(3):
        assert validation.triton_validated("layernorm", "cpu", torch.float32, width=32)
    assert kernel.calls == 1
    validation.triton_validated("layernorm", "cpu", torch.float32, width=48)  # another BLOCK_SIZE: checked
    validation.triton_validated("layernorm", "cpu", torch.float16, width=32)  # another dtype: checked
    validation.triton_validated("layernorm", "cpu", torch.float32, width=32, has_bias=False)  # another kernel
    assert kernel.calls == 4


def test_the_check_leaves_rng_and_autograd_state_alone():
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    with torch.inference_mode():
        assert validation.triton_validated("layernorm", "cpu", torch.float32, width=32)
        assert torch.is_inference_mode_enabled()
    with torch.no_grad():
        assert validation.triton_validated("rmsnorm", "cpu", torch.float32, width=32)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng)


def test_no_check_while_compiling(monkeypatch):
    kernel = Counted(layernorm_kernels.layer_norm_triton)
    plant(monkeypatch, "layernorm", kernel)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not validation.triton_validated("layernorm", "cpu", torch.float32, width=32)
    assert kernel.calls == 0 and validation._verdicts == {}  # checked later, outside the trace


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown kernel 'softmax'"):
        validation.triton_validated("softmax", "cpu", torch.float32, width=32)


def norm_inputs(width: int = 32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for shape in ((3, width), (width,), (width,))]


def test_auto_checks_nothing_off_the_gpu(monkeypatch):
    kernel = Counted(layernorm_kernels.layer_norm_triton)
    monkeypatch.setattr(layernorm_kernels, "layer_norm_triton", kernel)
    x, w, b = norm_inputs()
    torch.testing.assert_close(
        layer_norm(x, w, b, 1e-5, "auto"), F.layer_norm(x, (32,), w, b, 1e-5), rtol=0, atol=0
    )
    assert kernel.calls == 0 and validation._verdicts == {}


@pytest.fixture
def cpu_as_gpu(monkeypatch):
    """`auto` treats CPU tensors like CUDA ones: it checks the Triton kernels (interpreted) and uses them."""
    monkeypatch.setattr(validation, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))


@pytest.mark.usefixtures("cpu_as_gpu")
def test_auto_uses_the_kernel_once_it_passes(monkeypatch):
    kernel = Counted(layernorm_kernels.layer_norm_triton)
    monkeypatch.setattr(layernorm_kernels, "layer_norm_triton", kernel)
    x, w, b = norm_inputs()
    layer_norm(x, w, b, 1e-5, "auto")
    layer_norm(x, w, b, 1e-5, "auto")
    assert kernel.calls == 3  # the check, then both calls


@pytest.mark.usefixtures("cpu_as_gpu")
def test_auto_uses_the_torch_path_when_the_kernel_fails_its_check(monkeypatch, caplog):
    wrong = Counted(gradient_off_by(layernorm_kernels.layer_norm_triton, 1.05))
    monkeypatch.setattr(layernorm_kernels, "layer_norm_triton", wrong)
    x, w, b = norm_inputs()
    for _ in range(2):
        y = layer_norm(x, w, b, 1e-5, "auto")
        torch.testing.assert_close(y, F.layer_norm(x, (32,), w, b, 1e-5), rtol=0, atol=0)
    assert wrong.calls == 1  # the check only
    assert len(warnings_logged(caplog)) == 1
    layer_norm(x, w, b, 1e-5, "triton")  # forced: no check, the kernel runs
    assert wrong.calls == 2


@pytest.mark.usefixtures("cpu_as_gpu")
def test_rms_norm_auto_follows_its_own_check(monkeypatch, caplog):
    plant(monkeypatch, "rmsnorm", gradient_off_by(layernorm_kernels.rms_norm_triton, 1.05))
    x, w, _ = norm_inputs()
    torch.testing.assert_close(rms_norm(x, w, 1e-5, "auto"), F.rms_norm(x, (32,), w, 1e-5), rtol=0, atol=0)
    assert validation._verdicts == {("rmsnorm", torch.device("cpu"), torch.float32, (("width", 32),)): False}
    assert len(warnings_logged(caplog)) == 1
