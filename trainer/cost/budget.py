"""Time, money and energy of a run, and the Chinchilla view of what a compute budget should buy.

Time: seconds = tokens * model FLOPs per token / (gpus * peak FLOP/s * MFU). GPU-hours = gpus * seconds / 3600;
dollars = GPU-hours * price per GPU-hour; energy = GPU-hours * TDP (GPUs only, at full power: an upper bound
that leaves out hosts, network and cooling, PUE 1).

Chinchilla (Hoffmann et al. 2022): training compute C ~ 6*N*D, and compute-optimal models see D ~ 20*N tokens,
so N = sqrt(C / 120), D = 20*N. The approach-3 fit of the final loss is
L(N, D) = E + A / N^alpha + B / D^beta with E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import HardwareConfig

TOKENS_PER_PARAMETER = 20.0
CHINCHILLA_E, CHINCHILLA_A, CHINCHILLA_B = 1.69, 406.4, 410.7
CHINCHILLA_ALPHA, CHINCHILLA_BETA = 0.34, 0.28


@dataclass(frozen=True)
class RunCost:
    """Wall-clock, GPU-hours, dollars and energy of training `tokens` tokens."""

    tokens: float
    total_flops: float
    gpus: int
    mfu: float
    seconds: float
    gpu_hours: float
    dollars: float
    energy_kwh: float | None  # None when the hardware has no TDP

    @property
    def days(self) -> float:
        return self.seconds / 86400


def run_cost(tokens: float, flops_per_token: float, hardware: HardwareConfig, gpus: int, mfu: float) -> RunCost:
    """Time and money at an assumed MFU: seconds = tokens * flops_per_token / (gpus * peak_flops * mfu)."""
    if hardware.peak_flops <= 0:
        raise ValueError(f"hardware.peak_flops={hardware.peak_flops!r}: needs the accelerator's peak ({hardware.name})")
    if gpus < 1:
        raise ValueError(f"gpus={gpus!r}: must be >= 1")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu!r}: must be in (0, 1]")
    total_flops = tokens * flops_per_token
    seconds = total_flops / (gpus * hardware.peak_flops * mfu)
    gpu_hours = gpus * seconds / 3600
    energy = gpu_hours * hardware.tdp_watts / 1000 if hardware.tdp_watts > 0 else None
    return RunCost(tokens=tokens, total_flops=total_flops, gpus=gpus, mfu=mfu, seconds=seconds,
                   gpu_hours=gpu_hours, dollars=gpu_hours * hardware.price_per_hour, energy_kwh=energy)


def chinchilla_optimal(compute: float) -> tuple[float, float]:
    """Compute-optimal (parameters, tokens) for `compute` FLOPs: C = 6*N*D with D = 20*N, so N = sqrt(C/120)."""
    if compute <= 0:
        raise ValueError(f"compute={compute!r}: must be positive")
    params = math.sqrt(compute / (6 * TOKENS_PER_PARAMETER))
    return params, TOKENS_PER_PARAMETER * params


def chinchilla_loss(params: float, tokens: float) -> float:
    """Hoffmann et al.'s fitted loss (nats/token on MassiveText): E + A/N^0.34 + B/D^0.28."""
    if params <= 0 or tokens <= 0:
        raise ValueError(f"params={params!r}, tokens={tokens!r}: must be positive")
    return CHINCHILLA_E + CHINCHILLA_A / params**CHINCHILLA_ALPHA + CHINCHILLA_B / tokens**CHINCHILLA_BETA
