"""The engine's switches: activation checkpointing, ZeRO-Offload, the DeepSpeed pass-through."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import logged
from tests.workers.instruments import first_step_gradients, full_gradients, load_rank_gradients
from trainer.engine import build_deepspeed_config
from trainer.run import run

# Measured over 6 clipped steps: the losses equal the torch AdamW run's to the bit, the gradient norms
# (ZeRO sums the partition norms in another order) to 1.0e-7; ten times that leaves room for other CPUs.
OFFLOAD_RTOL = 1e-6


def run_with_gradients(config, grad_dir):
    """The run's summary and its first step's gradients, by single-process parameter name."""
    grad_dir.mkdir()
    with first_step_gradients(grad_dir):
        summary = run(config)
    return summary, full_gradients(load_rank_gradients(grad_dir))


def test_activation_checkpointing_recomputes_without_changing_the_numbers(small_run, tmp_path):
    steps = ["train.max_steps=3", "train.eval_interval=0", "train.checkpoint_interval=0"]
    plain, plain_grads = run_with_gradients(small_run(*steps, f"train.run_dir={tmp_path / 'plain'}"),
                                            tmp_path / "plain-grads")
    recomputed, grads = run_with_gradients(
        small_run(*steps, "train.activation_checkpointing=true", f"train.run_dir={tmp_path / 'ckpt'}"),
        tmp_path / "ckpt-grads")
    # Recomputing a block replays the same operations on the same inputs: the same bits.
    assert sorted(grads) == sorted(plain_grads)
    for name, expected in plain_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=0, atol=0, msg=name)
    assert recomputed.train_losses == pytest.approx(plain.train_losses, rel=1e-6)


def test_deepspeed_config_comes_from_ours_and_extra_wins(small_run):
    config = small_run("parallel.zero_stage=2", "train.grad_accum_steps=3", "optim.grad_clip=0.5",
                       "+deepspeed.extra.zero_optimization.overlap_comm=true",
                       "+deepspeed.extra.steps_per_print=7")
    ds = build_deepspeed_config(config, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # merged, not replaced
    assert ds["steps_per_print"] == 7
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_offload_lets_deepspeed_build_adam_on_the_cpu(small_run):
    ds = build_deepspeed_config(small_run("parallel.zero_stage=1", "parallel.offload_optimizer=true"), "fp32")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]


@pytest.mark.slow
def test_zero_offload_trains_like_the_gpu_optimizer(small_run, tmp_path):
    # DeepSpeedCPUAdam is JIT-compiled with g++ the first time (about a minute), then cached.
    steps = ["train.max_steps=6", "train.eval_interval=0", "train.checkpoint_interval=0", "optim.grad_clip=0.05"]
    plain = run(small_run(*steps, f"train.run_dir={tmp_path / 'plain'}"))
    offloaded = run(small_run(*steps, "parallel.zero_stage=1", "parallel.offload_optimizer=true",
                              f"train.run_dir={tmp_path / 'offload'}"))
    assert offloaded.train_losses == pytest.approx(plain.train_losses, rel=OFFLOAD_RTOL)
    norms = logged(tmp_path / "offload" / "metrics.jsonl", "train/grad_norm")
    expected = logged(tmp_path / "plain" / "metrics.jsonl", "train/grad_norm")
    assert sorted(norms) == list(range(1, 7)) and all(norm > 0.05 for norm in norms.values())
    assert norms == pytest.approx(expected, rel=OFFLOAD_RTOL)
