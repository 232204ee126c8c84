"""Ground truth for the single-process reference: `run()` against a plain PyTorch training loop.

Every layout test compares with the single-process run, so that run must itself be right. The loop below
is what a user would write by hand: AdamW over decayed matrices and undecayed vectors, the loss divided
by the accumulation count, global-norm clipping, linear warmup then cosine decay. It trains the same GPT
(same seed, so the same initial weights) on the same batches; the engine (DeepSpeed, our clipping, the
LambdaLR schedule, the step loop and its logs) must give the same losses, gradient norms, learning rates
and final weights.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.shards import read_index
from tests.conftest import logged
from trainer.config import Config, OptimConfig
from trainer.engine import build_model
from trainer.export import export
from trainer.parallel import init_topology, shutdown_topology
from trainer.run import build_train_stream, run

STEPS, ACCUM, CLIP = 6, 2, 0.05


def lr_by_hand(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Step `step` (1-based): lr * step / warmup while warming up, then a half cosine from lr to min_lr."""
    if step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    progress = (step - 1 - optim.warmup_steps) / (max_steps - optim.warmup_steps)
    return optim.min_lr + (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress)) / 2


def plain_training(config: Config) -> tuple[dict, dict, dict, dict]:
    """(losses, gradient norms, learning rates, final weights) of the hand-written loop."""
    topo = init_topology(config.parallel, "cpu")
    try:
        index = read_index(config.data.prepared_dir)
        model = build_model(config, index["vocab_size"], topo)
        batches = iter(build_train_stream(config, topo, index))
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        optim = config.optim
        optimizer = torch.optim.AdamW(
            [{"params": matrices, "weight_decay": optim.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
            lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        losses, norms, rates = {}, {}, {}
        for step in range(1, config.train.max_steps + 1):
            rates[step] = lr_by_hand(step, optim, config.train.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = rates[step]
            optimizer.zero_grad()
            total = 0.0
            for inputs, targets in itertools.islice(batches, ACCUM):
                loss = model(inputs, targets)
                (loss / ACCUM).backward()  # the mean gradient over the accumulated micro-batches
                total += loss.item() / ACCUM
            losses[step] = total
            norms[step] = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip).item()
            optimizer.step()
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        return losses, norms, rates, weights
    finally:
        shutdown_topology()


def test_run_equals_a_plain_pytorch_loop(small_run, tmp_path, one_thread):
    config = small_run(f"train.max_steps={STEPS}", f"train.grad_accum_steps={ACCUM}", f"optim.grad_clip={CLIP}",
                       "optim.warmup_steps=2", "optim.decay=cosine", "optim.min_lr=1e-4",
                       "train.eval_interval=0", "train.checkpoint_interval=0")
    summary = run(config)
    losses, norms, rates, weights = plain_training(config)

    metrics = tmp_path / "run" / "metrics.jsonl"
    assert summary.train_losses == pytest.approx(losses, rel=1e-6)
    assert logged(metrics, "train/grad_norm") == pytest.approx(norms, rel=1e-5)
    assert all(norm > CLIP for norm in norms.values())  # clipping acted at every step
    # The rate logged at a step is the rate that step's update used.
    assert logged(metrics, "train/lr") == pytest.approx(rates, rel=1e-12)
    trained = load_file(str(export(Path(summary.checkpoint), tmp_path / "model.safetensors")))
    for name, expected in weights.items():
        if name == "embedding.tokens.weight":
            expected = expected[: trained[name].shape[0]]
        torch.testing.assert_close(trained[name], expected, rtol=1e-5, atol=1e-7, msg=name)
