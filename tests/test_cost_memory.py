"""Memory per GPU: a hand-worked case, the direction of every switch, GPT-3 175B, and a measured run."""

from __future__ import annotations

import pytest

from trainer.config import HardwareConfig, ModelConfig
from trainer.cost.memory import GiB, Layout, estimate_memory, layer_activation_bytes
from trainer.cost.report import vocab_size

ONE_LAYER = ModelConfig(n_layer=1, n_head=2, n_embd=4, ffn_hidden_size=16, block_size=8)
GPT3_175B = ModelConfig(name="gpt3-175b", n_layer=96, n_head=96, n_embd=12288, block_size=2048,
                        vocab_size=50257, pad_vocab_to_multiple=128)
A100_80GB = HardwareConfig(name="a100-80gb", peak_flops=312e12, memory_gb=80)


def test_one_layer_by_hand():
    hardware = HardwareConfig(memory_gb=1)
    estimate = estimate_memory(ONE_LAYER, 64, Layout(seq_len=8), hardware)
    # 540 parameters (tests/test_cost_params.py; vocab 64 needs no padding): bf16 params 2*540, grads 2*540,
    # fp32 master + Adam m, v 12*540.
    assert (estimate.params, estimate.grads, estimate.optimizer) == (1080, 1080, 6480)
    # Activations, s=8, b=1, h=4, a=2: s*b*h = 32; 10 + (8 + 4*16/4) + 5*a*s/h = 10 + 24 + 20 = 54 -> 1728 bytes,
    # plus the loss's fp32 softmax 4*s*b*V = 4*8*64 = 2048.
    assert layer_activation_bytes(ONE_LAYER, Layout(seq_len=8)) == 1728
    assert estimate.activations == 1728 + 2048
    assert estimate.total == 8640 + 3776 and estimate.fits and estimate.headroom == GiB - 12416
    # fp32: 4 + 4 + 8 bytes per parameter; activations double (2048 for the softmax does not).
    fp32 = estimate_memory(ONE_LAYER, 64, Layout(seq_len=8, precision="fp32"), hardware)
    assert (fp32.params, fp32.grads, fp32.optimizer, fp32.activations) == (2160, 2160, 4320, 2 * 1728 + 2048)


def test_zero_stages_strictly_decrease_model_states():
    states = [estimate_memory(GPT3_175B, 50257, Layout(tp=8, dp=16, zero_stage=z), A100_80GB).model_states
              for z in (0, 1, 2, 3)]
    assert states == sorted(states, reverse=True) and len(set(states)) == 4
    # With dp = 1 there is nothing to partition over.
    single = {estimate_memory(ONE_LAYER, 64, Layout(zero_stage=z), A100_80GB).model_states for z in range(4)}
    assert len(single) == 1


def test_recompute_sequence_parallel_and_flash_lower_activations():
    base = Layout(tp=8, pp=8, dp=16, micro_batch=1, micro_batches=96)
    activations = {}
    for name, layout in {
        "base": base, "recompute": Layout(**{**base.__dict__, "recompute": True}),
        "sp": Layout(**{**base.__dict__, "sequence_parallel": True}),
        "flash": Layout(**{**base.__dict__, "flash_attention": True}),
    }.items():
        activations[name] = estimate_memory(GPT3_175B, 50257, layout, A100_80GB).activations
    assert activations["recompute"] < activations["sp"] < activations["base"]
    assert activations["flash"] < activations["base"]
    # 1F1B: the first stage holds pp micro-batches in flight, so pipeline depth does not shrink activations
    # as fast as it shrinks parameters.
    shallow = estimate_memory(GPT3_175B, 50257, Layout(tp=8, pp=2, dp=64, micro_batches=24), A100_80GB)
    assert shallow.activations == pytest.approx(activations["base"], rel=0.05)


def test_gpt3_175b_on_one_gpu_does_not_fit_and_says_by_how_much():
    estimate = estimate_memory(GPT3_175B, 50257, Layout(recompute=True), A100_80GB)
    # ~174.6e9 parameters x 16 bytes = 2.79e12 bytes = 2602 GiB of model states alone.
    assert estimate.model_states / GiB == pytest.approx(174.6e9 * 16 / GiB, rel=0.01)
    assert not estimate.fits
    assert -estimate.headroom / GiB == pytest.approx(estimate.total / GiB - 80)
    assert estimate.as_gib()["headroom"] < -2500


def test_model_states_match_a_measured_fp32_run(small_run):
    from trainer.run import run

    config = small_run("train.max_steps=2", "train.eval_interval=0", "train.checkpoint_interval=0",
                       "train.precision=fp32", "optim.warmup_steps=1")
    measured = run(config).memory_per_rank[0]
    layout = Layout(micro_batch=config.train.micro_batch_size, seq_len=config.seq_len, precision="fp32")
    estimate = estimate_memory(config.model, vocab_size(config), layout, config.hardware)
    # fp32 ZeRO-0: the parameters are the master copy (4 bytes each); Adam keeps m and v (8 bytes each).
    assert estimate.params / 2**20 == pytest.approx(measured["params_mb"], rel=0.03)
    assert estimate.optimizer / 2**20 == pytest.approx(measured["optimizer_mb"], rel=0.03)
