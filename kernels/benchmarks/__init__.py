"""GPU benchmarks of the kernels against torch (run one with `python -m kernels.benchmarks.<name>`)."""

import importlib.util

import torch


def cannot_run(name: str) -> str | None:
    """Why `kernels.benchmarks.<name>` cannot run on this machine (no GPU, no plotting packages), or None."""
    if not torch.cuda.is_available():
        return f"kernels.benchmarks.{name}: no CUDA device; this benchmark needs a GPU."
    missing = [m for m in ("pandas", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        return f"kernels.benchmarks.{name}: triton.testing.perf_report needs {', '.join(missing)}."
    return None
