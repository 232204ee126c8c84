"""Time and money, Chinchilla, the layout search and the hardware table (the CLI: tests/test_cost_cli.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from trainer.config import CONF_DIR, HardwareConfig, ModelConfig, compose_config
from trainer.cost.budget import chinchilla_loss, chinchilla_optimal, run_cost
from trainer.cost.memory import Layout
from trainer.cost.planner import search_layouts, step_times
from trainer.cost.report import default_global_batch

GPT3_175B = ModelConfig(name="gpt3-175b", n_layer=96, n_head=96, n_embd=12288, block_size=2048,
                        vocab_size=50257, pad_vocab_to_multiple=128)
A100_80GB = HardwareConfig(name="a100-80gb", peak_flops=312e12, memory_gb=80, price_per_hour=1.5, tdp_watts=400)


def test_run_cost_by_hand():
    hardware = HardwareConfig(peak_flops=100.0, price_per_hour=2.0, tdp_watts=500)
    # 3600 tokens x 10 FLOPs = 36000 FLOPs on 2 GPUs at 100 FLOP/s x 0.5 MFU = 100 FLOP/s -> 360 s.
    cost = run_cost(3600, 10, hardware, gpus=2, mfu=0.5)
    assert cost.seconds == 360 and cost.days == 360 / 86400
    assert cost.gpu_hours == 0.2 and cost.dollars == 0.4  # 2 GPUs x 0.1 h; 0.2 GPU-h x $2
    assert cost.energy_kwh == pytest.approx(0.1)  # 0.2 GPU-h x 500 W
    assert run_cost(3600, 10, HardwareConfig(peak_flops=100.0), 2, 0.5).energy_kwh is None
    with pytest.raises(ValueError, match="mfu"):
        run_cost(1, 1, hardware, 1, 1.5)


def test_chinchilla_by_hand():
    # C = 6 * N * 20N = 120 N^2, so C = 120e18 gives N = sqrt(1e18) = 1e9 and D = 20e9.
    params, tokens = chinchilla_optimal(120e18)
    assert params == pytest.approx(1e9) and tokens == pytest.approx(20e9)
    # Chinchilla itself: 70B on 1.4T tokens, C ~ 5.9e23, gives about 70B and 1.4T back.
    params, tokens = chinchilla_optimal(6 * 70e9 * 1.4e12)
    assert params == pytest.approx(70e9, rel=0.01) and tokens == pytest.approx(1.4e12, rel=0.01)
    expected = 1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28
    assert chinchilla_loss(70e9, 1.4e12) == pytest.approx(expected) and 1.9 < expected < 2.0
    assert chinchilla_loss(math.inf, math.inf) == 1.69


def test_step_time_components():
    layout = Layout(tp=8, pp=8, dp=16, micro_batch=1, micro_batches=96, sequence_parallel=True)
    times = step_times(GPT3_175B, 50257, A100_80GB, layout, global_batch=1536)
    # Bubble: (pp - 1) / m of the per-pipeline work = 7/96 of compute + tp communication.
    assert times["bubble"] == pytest.approx((times["compute"] + times["tp_comm"]) * 7 / 96)
    assert times["recompute"] == 0 and times["zero3"] == 0 and times["tp_comm"] > 0
    recomputed = step_times(GPT3_175B, 50257, A100_80GB, Layout(**{**layout.__dict__, "recompute": True}), 1536)
    assert recomputed["recompute"] / recomputed["compute"] == pytest.approx(1 / 3, rel=0.02)


def test_gpt3_175b_on_1024_a100s_finds_fitting_layouts():
    candidates = search_layouts(GPT3_175B, 50257, A100_80GB, gpus=1024, global_batch=1536, seq_len=2048)
    runnable = [c for c in candidates if c.blocked is None]
    assert runnable and all(c.memory.fits for c in runnable)
    best = runnable[0]
    assert best.reason == "best" and best.layout.tp == 8 and best.layout.gpus == 1024
    assert 0.3 < best.mfu <= 0.4
    assert [c.step_seconds for c in runnable] == sorted(c.step_seconds for c in runnable)
    categories = {c.category for c in candidates}
    assert {"memory", "bubble", "recompute", "zero3"} <= categories
    too_big = next(c for c in candidates if c.category == "memory")
    assert "doesn't fit" in too_big.reason and "GiB over 80 GiB" in too_big.reason


def test_default_global_batch_follows_gpt3():
    assert default_global_batch(174.6e9, 2048) == 1536
    assert default_global_batch(125e6, 2048) == 256
    assert default_global_batch(1.3e9, 2048) == 512


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF_DIR) / "hardware").glob("*.yaml")))
def test_every_hardware_preset_composes(name):
    hardware = compose_config([f"hardware={name}", "train.run_dir=unused"]).hardware
    assert hardware.name == name
    assert name in ("cpu", "auto") or (hardware.peak_flops > hardware.peak_flops_tf32 > hardware.peak_flops_fp32 > 0
                                      and hardware.memory_gb > 0 and hardware.tdp_watts > 0)
