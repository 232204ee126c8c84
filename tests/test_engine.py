"""The engine's switches: activation checkpointing, ZeRO-Offload, the DeepSpeed pass-through."""

from __future__ import annotations

import pytest

from trainer.engine import build_deepspeed_config
from trainer.run import run


def test_activation_checkpointing_recomputes_without_changing_the_numbers(small_run, tmp_path):
    steps = ["train.max_steps=3", "train.eval_interval=0", "train.checkpoint_interval=0"]
    plain = run(small_run(*steps, f"train.run_dir={tmp_path / 'plain'}"))
    recomputed = run(small_run(*steps, "train.activation_checkpointing=true", f"train.run_dir={tmp_path / 'ckpt'}"))
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
    steps = ["train.max_steps=3", "train.eval_interval=0", "train.checkpoint_interval=0"]
    plain = run(small_run(*steps, f"train.run_dir={tmp_path / 'plain'}"))
    offloaded = run(small_run(*steps, "parallel.zero_stage=1", "parallel.offload_optimizer=true",
                              f"train.run_dir={tmp_path / 'offload'}"))
    assert offloaded.train_losses == pytest.approx(plain.train_losses, rel=1e-4)
