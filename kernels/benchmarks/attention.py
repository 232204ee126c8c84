"""Causal attention throughput: our Triton flash attention vs SDPA's flash and cuDNN backends vs plain torch.

    python -m kernels.benchmarks.attention [--head-dim 128|64] [--mode fwd|bwd|fwd+bwd|all]
                                           [--seq-lens 1024,4096,16384] [--out benchmarks/results/attention]

bf16, causal, T from 1024 to 16384 (or --seq-lens) with B * T = 4096 tokens until B reaches 1, H * D = 2048 (16 heads of 128,
32 of 64). Reports TFLOP/s and, where the device is known, its dense bf16 peak. Needs CUDA, triton.testing's
pandas and matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.attention import attention_reference, attention_sdpa, flash_attention
from kernels.benchmarks import cannot_run
from trainer.hardware import detect_gpu, load_preset, preset_for_gpu

SEQ_LENS = [1024 * 2**i for i in range(5)]  # 1k .. 16k
TOKENS = 4096  # B * T while B >= 1: the same work per step at 1k-4k, then growing as T^2 / T
MODEL_WIDTH = 2048  # H * D
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = {"triton": "Triton (ours)", "flash": "SDPA flash", "cudnn": "SDPA cuDNN", "torch": "torch (T x T)"}
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
PEAK = "peak"


def device_peak_tflops() -> float | None:
    """The GPU's dense bf16 peak in TFLOP/s from its conf/hardware preset (trainer/hardware.py), None without one."""
    preset = preset_for_gpu(detect_gpu(torch.device("cuda", 0)))
    return load_preset(preset).peak_flops / 1e12 if preset else None


def flops(mode: str, batch: int, heads: int, seq_len: int, head_dim: int) -> float:
    """Matmul flops of causal attention (softmax and masks are not counted, as in FA2's reports)."""
    # Forward: S = Q K^T and O = P V, 2 * T * T * D each per head -> 4 * B * H * T^2 * D, halved by the mask.
    # Backward: dV = P^T dO, dP = dO V^T, dS -> dQ = dS K, dK = dS^T Q, plus recomputing S: 5 matmuls, 2.5x.
    forward = 0.5 * 4 * batch * heads * seq_len * seq_len * head_dim
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[mode]


def fits_plain_torch(batch: int, heads: int, seq_len: int) -> bool:
    # The reference keeps ~16 bytes per score for fwd+bwd: bf16 scores, masked copy, fp32 softmax, bf16 P
    # and their gradients. Beyond half the device memory it would only measure the allocator.
    return 16 * batch * heads * seq_len**2 < 0.5 * torch.cuda.get_device_properties(0).total_memory


def _benchmarks(modes: list[str], head_dim: int, peak: float | None, seq_lens: list[int]
                ) -> list[triton.testing.Benchmark]:
    lines = list(PROVIDERS) + ([PEAK] if peak else [])
    names = list(PROVIDERS.values()) + ([f"device peak ({peak:.0f})"] if peak else [])
    styles = [("blue", "-"), ("green", "-"), ("red", "-"), ("orange", "-"), ("black", "--")]
    return [
        triton.testing.Benchmark(
            x_names=["T"], x_vals=seq_lens, line_arg="provider", line_vals=lines, line_names=names,
            styles=styles[: len(lines)], xlabel="sequence length", ylabel="TFLOP/s", x_log=True,
            plot_name=f"attention-causal-{mode.replace('+', '-')}-d{head_dim}-bf16",
            args={"mode": mode, "head_dim": head_dim, "peak": peak},
        )
        for mode in modes
    ]  # fmt: skip


def bench_attention(T: int, provider: str, mode: str, head_dim: int, peak: float | None):  # T: perf_report's x_name
    """(median, max, min) TFLOP/s of one provider at sequence length T; NaN where it does not run."""
    batch, heads = max(1, TOKENS // T), MODEL_WIDTH // head_dim
    if provider == PEAK:
        return peak, peak, peak
    if provider == "torch" and not fits_plain_torch(batch, heads, T):
        return float("nan"), float("nan"), float("nan")
    fn = {"triton": flash_attention, "torch": attention_reference}.get(provider, attention_sdpa)
    backend = sdpa_kernel(SDPA_BACKENDS[provider]) if provider in SDPA_BACKENDS else contextlib.nullcontext()
    q, k, v = (
        torch.randn(batch, heads, T, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "fwd")
        for _ in range(3)
    )
    try:
        with backend:
            if mode == "fwd":
                step = lambda: fn(q, k, v)  # noqa: E731
            elif mode == "bwd":
                out, grad_out = fn(q, k, v), torch.randn_like(q)
                step = lambda: out.backward(grad_out, retain_graph=True)  # noqa: E731
            else:
                grad_out = torch.randn_like(q)
                step = lambda: fn(q, k, v).backward(grad_out)  # noqa: E731
            ms, min_ms, max_ms = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=[q, k, v])
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("nan"), float("nan")
    except RuntimeError as exc:  # an SDPA backend this build or GPU lacks (e.g. cuDNN): no figure, say why
        if provider not in SDPA_BACKENDS:
            raise
        print(f"{PROVIDERS[provider]} at T={T}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return float("nan"), float("nan"), float("nan")
    work = flops(mode, batch, heads, T, head_dim)

    def tflops(t_ms: float) -> float:
        return work / (t_ms * 1e-3) / 1e12

    return tflops(ms), tflops(max_ms), tflops(min_ms)


def _seq_lens(text: str) -> list[int]:
    try:
        lens = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not lens or min(lens) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: sequence lengths must be >= 16")
    return lens


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the tables, write one CSV and one PNG per mode under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, choices=[64, 128], default=128)
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--seq-lens", type=_seq_lens, default=SEQ_LENS, help="comma-separated, e.g. 1024,4096")
    parser.add_argument("--out", default="benchmarks/results/attention", help="folder for the CSV and PNG files")
    args = parser.parse_args(argv)
    reason = cannot_run("attention")
    if reason is not None:
        print(reason, file=sys.stderr)
        return 1
    modes = list(MODES) if args.mode == "all" else [args.mode]
    peak = device_peak_tflops()
    os.makedirs(args.out, exist_ok=True)  # perf_report saves each PNG before it creates the folder
    print(f"Causal attention, bf16, D={args.head_dim}, H={MODEL_WIDTH // args.head_dim}, B*T={TOKENS} (B >= 1), "
          f"TFLOP/s on {torch.cuda.get_device_name()}; device peak: {peak or 'unknown'}")
    triton.testing.perf_report(_benchmarks(modes, args.head_dim, peak, args.seq_lens))(bench_attention).run(
        print_data=True, save_path=args.out
    )
    print(f"CSV and PNG written to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
