"""Reconciling the measured run with its plan while it trains: MFU, HFU, projected time and cost, the gap.

The plan is the cost model's: the configured token budget trained at `cost.assumed_mfu` of the
hardware's peak. Every logging interval the measured tokens/s is turned into achieved FLOP/s per device,
MFU (model FLOPs) and HFU (hardware FLOPs, recomputation included), a projection of the time and money to
finish the budget, and the gap (planned tokens/s over measured). When the run falls short of the plan by
more than `cost.gap_margin`, the step time is split into its phases so the user sees where it goes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hydragpt" / "cpu_peak.json"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_matmuls(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, repeats: int) -> float:
    """Seconds for `repeats` products a @ b, the device's queue drained before and after."""
    _synchronize(a.device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b, out=out)
    _synchronize(a.device)
    return time.perf_counter() - started


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                        seconds: float = 0.2, trials: int = 5) -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device` (2 n^3 FLOPs per product; n = 1024 on a CPU, 8192 on a
    GPU).

    The best of several trials of about `seconds` each, so that a neighbour's burst of work does not pass for
    the peak.
    """
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    _time_matmuls(a, b, out, 1)  # warm up the BLAS
    once = _time_matmuls(a, b, out, 1)
    repeats = max(1, round(seconds / max(once, 1e-6)))
    return max(2 * size**3 * repeats / _time_matmuls(a, b, out, repeats) for _ in range(trials))


def measure_cpu_peak(size: int = 1024, seconds: float = 0.2, trials: int = 5) -> float:
    """FLOP/s of an fp32 matmul on this process's CPU threads."""
    return measure_matmul_peak(torch.device("cpu"), torch.float32, size, seconds, trials)


def _peak_cache_key(device: torch.device, dtype: torch.dtype) -> str:
    """What the measured peak depends on: the processor and its threads, or the GPU; and the dtype (and, for
    fp32 on a GPU, whether matmuls run as TF32)."""
    if device.type == "cuda":
        tf32 = "|tf32" if dtype == torch.float32 and tf32_matmuls() else ""
        return f"v3|cuda|{torch.cuda.get_device_name(device)}|{dtype}{tf32}"
    return f"v3|{platform.processor() or platform.machine()}|{os.cpu_count()}|{torch.get_num_threads()}|{dtype}"


def tf32_matmuls() -> bool:
    """Whether fp32 matmuls on CUDA run on TF32 tensor cores; torch's default (and the trainer's) is full fp32."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def measured_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The matmul peak of this CPU or GPU in `dtype`, measured once per machine, then read from a cache file.

    Delete the cache file to measure again (e.g. if the machine was busy the first time).
    """
    key = _peak_cache_key(device, dtype)
    try:
        cached = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_matmul_peak(device, dtype)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_name(CACHE.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached))
        tmp.replace(CACHE)
    return float(cached[key])


def cpu_peak_flops() -> float:
    """The CPU's fp32 matmul peak (measured once per machine and thread count, then cached)."""
    return measured_peak_flops(torch.device("cpu"), torch.float32)


@dataclass(frozen=True)
class Plan:
    """What the run should achieve if it reaches the assumed MFU."""

    devices: int
    peak_flops: float  # per device in the run's precision; measured for a CPU or a GPU without a preset
    peak_source: str
    assumed_mfu: float
    flops_per_token: float  # model FLOPs
    hardware_flops_per_token: float  # with activation recomputation
    token_budget: float
    price_per_hour: float  # per device

    @property
    def tokens_per_s(self) -> float:
        return self.assumed_mfu * self.peak_flops * self.devices / self.flops_per_token

    @property
    def seconds(self) -> float:
        return self.token_budget / self.tokens_per_s

    def cost(self, seconds: float) -> float:
        """Dollars for `seconds` of the whole job (device-hours when no price is set)."""
        hours = self.devices * seconds / 3600
        return hours * self.price_per_hour if self.price_per_hour > 0 else hours

    @property
    def cost_unit(self) -> str:
        return "$" if self.price_per_hour > 0 else "device-hours"


@dataclass
class Reconciler:
    """Turns each interval's measurements into the plan-versus-measured figures."""

    plan: Plan
    gap_margin: float
    elapsed: float = 0.0
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (tokens seen, measured s, planned s)
    # A lagging run says where its time goes when it starts lagging, when the slowest phase changes, and
    # otherwise once every this many intervals (the metrics carry every interval).
    lag_log_every: int = 50
    _lag_logged: tuple[int, str] | None = None  # (interval, slowest phase) of the last such line

    def update(self, tokens_seen: int, interval_tokens: int, interval_seconds: float,
               phases: dict[str, float]) -> dict[str, float]:
        """Metrics for one logging interval; logs where the time goes when the run lags the plan."""
        plan = self.plan
        self.elapsed += interval_seconds
        tokens_per_s = interval_tokens / max(interval_seconds, 1e-9)
        per_device = tokens_per_s * plan.flops_per_token / plan.devices
        projected = self.elapsed + max(plan.token_budget - tokens_seen, 0) / max(tokens_per_s, 1e-9)
        gap = plan.tokens_per_s / max(tokens_per_s, 1e-9)
        self.history.append((tokens_seen, self.elapsed, tokens_seen / plan.tokens_per_s))
        metrics = {
            "cost/achieved_flops_per_device": per_device,
            "cost/mfu": per_device / plan.peak_flops,
            "cost/hfu": tokens_per_s * plan.hardware_flops_per_token / plan.devices / plan.peak_flops,
            "cost/projected_seconds": projected,
            "cost/planned_seconds": plan.seconds,
            "cost/projected_cost": plan.cost(projected),
            "cost/planned_cost": plan.cost(plan.seconds),
            "cost/gap": gap,
        }
        if gap > 1 + self.gap_margin:
            self._log_lag(gap, metrics["cost/mfu"], phases)
        else:
            self._lag_logged = None
        return metrics

    def _log_lag(self, gap: float, mfu: float, phases: dict[str, float]) -> None:
        interval = len(self.history)
        slowest = max((k for k in phases if k != "communication"), key=phases.get, default="")
        if self._lag_logged is not None:
            last_interval, last_slowest = self._lag_logged
            if slowest == last_slowest and interval - last_interval < self.lag_log_every:
                return
        self._lag_logged = (interval, slowest)
        log.info("behind plan by %.2fx (MFU %.1f%% vs %.0f%% assumed); step time: %s", gap, 100 * mfu,
                 100 * self.plan.assumed_mfu, describe_phases(phases))

    def summary(self) -> str:
        """A small table: planned versus measured, at the end of the run."""
        plan = self.plan
        tokens, measured, planned = self.history[-1] if self.history else (0, 0.0, 0.0)
        rows = [
            ("", "planned", "measured"),
            ("tokens/s", f"{plan.tokens_per_s:,.0f}", f"{tokens / max(measured, 1e-9):,.0f}"),
            ("MFU", f"{plan.assumed_mfu:.1%}",
             f"{tokens * plan.flops_per_token / max(measured, 1e-9) / plan.devices / plan.peak_flops:.1%}"),
            (f"time for {tokens:,} tokens", f"{planned:,.1f} s", f"{measured:,.1f} s"),
            (f"cost ({plan.cost_unit})", f"{plan.cost(planned):.4g}", f"{plan.cost(measured):.4g}"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{a:<{width}}  {b:>14}  {c:>14}" for a, b, c in rows)

    def plot(self, path: Path) -> Path | None:
        """PNG of planned versus measured cumulative cost against tokens; None without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib is not installed: no cost plot")
            return None
        tokens = [t for t, _, _ in self.history]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(tokens, [self.plan.cost(p) for _, _, p in self.history], label=f"plan ({self.plan.assumed_mfu:.0%} MFU)")
        ax.plot(tokens, [self.plan.cost(m) for _, m, _ in self.history], marker=".", label="measured")
        ax.set_xlabel("tokens")
        ax.set_ylabel(f"cumulative cost ({self.plan.cost_unit})")
        ax.set_title(f"planned vs measured cost, {self.plan.devices} x {self.plan.peak_source}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def describe_phases(phases: dict[str, float]) -> str:
    """'backward 48% (0.2 s), forward 41% (...), ...; of which communication 12% (...)' from seconds per phase.

    `communication` (DeepSpeed's collectives, when timed) happens inside backward and optimizer, so it is
    reported as a share of the step rather than as one more slice of it.
    """
    phases = dict(phases)
    communication = phases.pop("communication", None)
    total = sum(phases.values()) or 1.0
    text = ", ".join(f"{name} {seconds / total:.0%} ({seconds:.3g} s)"
                     for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]))
    if communication is not None:
        text += f"; of which communication {communication / total:.0%} ({communication:.3g} s)"
    return text
