"""LayerNorm bandwidth: our Triton kernel vs F.layer_norm (and apex) against a device-to-device copy.

    python -m kernels.benchmarks.layernorm [--mode forward|backward|forward+backward|all] [--dtype bf16]
                                           [--out benchmarks/results/layernorm]

M = 4096 rows, row width N from 512 to 16384. Needs CUDA, triton.testing's pandas and matplotlib.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kernels.benchmarks import cannot_run
from kernels.layernorm import layer_norm_triton

ROWS = 4096
WIDTHS = [512 * 2**i for i in range(6)]  # 512 .. 16384
MODES = ("forward", "backward", "forward+backward")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-5


@functools.cache
def providers() -> dict[str, tuple[str, object]]:
    """name -> (label, fn(x, weight, bias)); apex only where its source-built extension imports."""
    found = {
        "triton": ("Triton (ours)", lambda x, w, b: layer_norm_triton(x, w, b, EPS)),
        "torch": ("F.layer_norm", lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)),
    }
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except ImportError:  # apex is not on PyPI: an optional GPU extra (see pyproject.toml)
        return found
    found["apex"] = (
        "apex FusedLayerNorm",
        lambda x, w, b: fused_layer_norm_affine(x, w, b, (x.shape[-1],), EPS),
    )
    return found


COPY = "copy"  # roofline: torch.empty_like(x).copy_(x), the bandwidth a memory-bound kernel can reach


def bytes_moved(mode: str, rows: int, width: int, element_size: int) -> int:
    """Bytes a fused LayerNorm must move between HBM and the SMs, counting M x N tensors only."""
    # forward: read x, write y                    -> 2 * M * N * element_size
    # backward: read x and dy, write dx           -> 3 * M * N * element_size
    # forward+backward: the sum of the two        -> 5 * M * N * element_size
    # Weights, bias, mean/rstd and dw/db partials are O(N + M): under 1% here, left out.
    tensors = {"forward": 2, "backward": 3, "forward+backward": 5}[mode]
    return tensors * rows * width * element_size


def _benchmarks(modes: list[str], dtype_name: str) -> list[triton.testing.Benchmark]:
    return [
        triton.testing.Benchmark(
            x_names=["N"],
            x_vals=WIDTHS,
            line_arg="provider",
            line_vals=[*providers(), COPY],
            line_names=[name for name, _ in providers().values()] + ["copy (roofline)"],
            styles=[("blue", "-"), ("green", "-"), ("orange", "-"), ("black", "--")][: len(providers())]
            + [("black", "--")],
            ylabel="GB/s",
            plot_name=f"layernorm-{mode.replace('+', '-')}-{dtype_name}-M{ROWS}",
            args={"mode": mode, "dtype_name": dtype_name},
        )
        for mode in modes
    ]


def bench_layer_norm(N: int, provider: str, mode: str, dtype_name: str):  # N: perf_report's x_name
    """(median, max, min) GB/s of one provider at row width N."""
    dtype = DTYPES[dtype_name]
    x = torch.randn(ROWS, N, device="cuda", dtype=dtype)
    weight = torch.rand(N, device="cuda", dtype=dtype)
    bias = torch.rand(N, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    quantiles = [0.5, 0.2, 0.8]
    if provider == COPY:
        # A copy moves 2 tensors; report the bandwidth it reaches, the ceiling for every mode.
        ms, min_ms, max_ms = triton.testing.do_bench(
            lambda: torch.empty_like(x).copy_(x), quantiles=quantiles
        )
        moved = 2 * x.numel() * x.element_size()
    else:
        fn = providers()[provider][1]
        for t in (x, weight, bias):
            t.requires_grad_(mode != "forward")
        y = fn(x, weight, bias)

        def step():
            if mode == "forward":
                fn(x, weight, bias)
            elif mode == "backward":
                y.backward(dy, retain_graph=True)
            else:
                fn(x, weight, bias).backward(dy)

        ms, min_ms, max_ms = triton.testing.do_bench(
            step, quantiles=quantiles, grad_to_none=[x, weight, bias]
        )
        moved = bytes_moved(mode, ROWS, N, x.element_size())

    def gbps(t_ms: float) -> float:
        return moved / (t_ms * 1e-3) / 1e9

    return gbps(ms), gbps(max_ms), gbps(min_ms)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the tables, write one CSV and one PNG per mode under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument(
        "--out", default="benchmarks/results/layernorm", help="folder for the CSV and PNG files"
    )
    args = parser.parse_args(argv)
    reason = cannot_run("layernorm")
    if reason is not None:
        print(reason, file=sys.stderr)
        return 1
    modes = list(MODES) if args.mode == "all" else [args.mode]
    print(f"LayerNorm, M={ROWS}, {args.dtype}, GB/s; providers: {', '.join([*providers(), COPY])}")
    triton.testing.perf_report(_benchmarks(modes, args.dtype))(bench_layer_norm).run(
        print_data=True, save_path=args.out
    )
    print(f"CSV and PNG written to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
