"""The learning-rate schedule (a pure function of the step), its LambdaLR wrapper, and AdamW's groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainer.config import KernelsConfig, ModelConfig, OptimConfig, ParallelConfig
from trainer.model import GPT
from trainer.optim import build_optimizer, build_scheduler, lr_at, param_groups
from trainer.parallel.topology import init_topology, shutdown_topology

LR, MIN_LR, WARMUP, MAX_STEPS = 1e-3, 1e-4, 10, 110  # 100 decay steps after warmup


def optim_config(**overrides) -> OptimConfig:
    fields = dict(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, decay="cosine")
    fields.update(overrides)
    return OptimConfig(**fields)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(decay):
    cfg = optim_config(decay=decay)
    assert lr_at(0, cfg, MAX_STEPS) == pytest.approx(LR / WARMUP)
    for step in range(WARMUP):
        assert lr_at(step, cfg, MAX_STEPS) == pytest.approx(LR * (step + 1) / WARMUP)
    assert lr_at(WARMUP - 1, cfg, MAX_STEPS) == pytest.approx(LR)
    assert lr_at(WARMUP, cfg, MAX_STEPS) == pytest.approx(LR)  # decay starts from the peak


def test_no_warmup_starts_at_peak():
    assert lr_at(0, optim_config(warmup_steps=0), MAX_STEPS) == pytest.approx(LR)


def test_cosine_reaches_min_lr_at_max_steps_and_stays_there():
    cfg = optim_config(decay="cosine")
    assert lr_at(WARMUP + 50, cfg, MAX_STEPS) == pytest.approx((LR + MIN_LR) / 2)  # cos(pi/2) = 0
    assert lr_at(WARMUP + 25, cfg, MAX_STEPS) == pytest.approx(MIN_LR + (LR - MIN_LR) * 0.5 * (1 + 2**-0.5))
    assert lr_at(MAX_STEPS, cfg, MAX_STEPS) == pytest.approx(MIN_LR)
    assert lr_at(MAX_STEPS + 100, cfg, MAX_STEPS) == pytest.approx(MIN_LR)


def test_cosine_decreases_monotonically_after_warmup():
    cfg = optim_config(decay="cosine")
    lrs = [lr_at(step, cfg, MAX_STEPS) for step in range(WARMUP, MAX_STEPS + 1)]
    assert all(later < earlier for earlier, later in zip(lrs, lrs[1:], strict=False))
    assert all(MIN_LR <= lr <= LR for lr in lrs)


def test_linear_decay():
    cfg = optim_config(decay="linear")
    assert lr_at(WARMUP + 50, cfg, MAX_STEPS) == pytest.approx((LR + MIN_LR) / 2)
    assert lr_at(WARMUP + 25, cfg, MAX_STEPS) == pytest.approx(LR - 0.25 * (LR - MIN_LR))
    assert lr_at(MAX_STEPS, cfg, MAX_STEPS) == pytest.approx(MIN_LR)
    assert lr_at(MAX_STEPS + 5, cfg, MAX_STEPS) == pytest.approx(MIN_LR)


def test_constant_after_warmup():
    cfg = optim_config(decay="constant")
    for step in (WARMUP, WARMUP + 1, MAX_STEPS // 2, MAX_STEPS, MAX_STEPS + 10):
        assert lr_at(step, cfg, MAX_STEPS) == pytest.approx(LR)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_scheduler_reproduces_lr_at(decay):
    cfg = optim_config(decay=decay)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, MAX_STEPS)
    model(torch.ones(2, 4)).sum().backward()
    # As in training: optimizer step k runs with lr_at(k), then the scheduler advances to k + 1.
    for step in range(MAX_STEPS + 5):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(lr_at(step, cfg, MAX_STEPS), rel=1e-12), step
        optimizer.step()
        scheduler.step()


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.linear = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3)  # a >2-D weight is decayed too
        self.shared = self.linear  # a second reference must not count the parameters twice
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_split_matrices_from_vectors_and_cover_each_parameter_once():
    model = _Tiny()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert {id(p) for p in decay["params"]} == {
        id(model.embedding.weight),
        id(model.linear.weight),
        id(model.conv.weight),
    }
    assert {id(p) for p in no_decay["params"]} == {
        id(model.linear.bias),
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.conv.bias),
    }
    listed = [id(p) for p in decay["params"] + no_decay["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(listed) == len(set(listed)) == len(trainable)
    assert set(listed) == set(trainable)


def test_optimizer_uses_the_configured_hyperparameters():
    cfg = optim_config(weight_decay=0.05, beta1=0.8, beta2=0.99, eps=1e-6)
    optimizer = build_optimizer(_Tiny(), cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    for group in optimizer.param_groups:
        assert group["lr"] == LR and group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6


@pytest.fixture(scope="module")
def topology():
    yield init_topology(ParallelConfig(), "cpu")
    shutdown_topology()


def test_param_groups_of_the_gpt(topology):
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=32), KernelsConfig(), 100, seed=0)
    names = {id(p): name for name, p in model.named_parameters()}
    decay, no_decay = param_groups(model, weight_decay=0.1)
    decayed = sorted(names[id(p)] for p in decay["params"])
    undecayed = sorted(names[id(p)] for p in no_decay["params"])
    assert decayed == sorted(
        ["embedding.tokens.weight", "embedding.positions.weight"]
        + [
            f"blocks.{i}.{layer}.weight"
            for i in range(2)
            for layer in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
        ]
    )
    assert all(name.endswith(".bias") or ".ln_" in name for name in undecayed)
    assert len(decayed) + len(undecayed) == len(names)  # the tied head adds no parameter of its own
