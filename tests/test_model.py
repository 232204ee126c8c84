"""The GPT at tp=1 on the CPU: shapes, parameter count, causality, initialisation, determinism, kernels, training."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import KernelsConfig, ModelConfig, OptimConfig
from trainer.model import GPT
from trainer.optim import build_optimizer
from trainer.vocab import padded_vocab_size

VOCAB = 100
PADDED_VOCAB = 128  # 100 rounded up to a multiple of 64 (pad_vocab_to_multiple) at tp=1


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(n_layer=2, n_head=4, n_embd=32, block_size=32)
    fields.update(overrides)
    return ModelConfig(**fields)


def build(cfg: ModelConfig | None = None, seed: int = 0, **kernels) -> GPT:
    return GPT(cfg or tiny_config(), KernelsConfig(**kernels), VOCAB, seed=seed)


def random_tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("cpu_topology")


def test_logits_shape_is_batch_by_time_by_padded_vocab():
    model = build()
    logits = model(random_tokens(3, 17))
    assert model.vocab_size == PADDED_VOCAB
    assert logits.shape == (3, 17, PADDED_VOCAB)


@pytest.mark.parametrize(
    ("vocab", "multiple", "tp", "expected"),
    [
        (100, 64, 1, 128),
        (128, 64, 1, 128),  # already a multiple: unchanged
        (129, 64, 1, 192),
        (100, 64, 2, 128),  # each of 2 shards gets 64 rows
        (100, 64, 4, 256),  # each of 4 shards must hold a multiple of 64 rows
        (1, 8, 1, 8),
        (50257, 64, 1, 50304),  # GPT-2's vocabulary
        (50257, 128, 8, 51200),  # 50 x 1024
    ],
)
def test_padded_vocab_size_rounds_up_to_multiple_times_tp(vocab, multiple, tp, expected):
    padded = padded_vocab_size(vocab, multiple, tp)
    assert padded == expected
    assert padded % (multiple * tp) == 0 and padded - vocab < multiple * tp


def test_parameter_count_matches_closed_form():
    cfg = tiny_config(n_layer=3, ffn_hidden_size=48)
    d, ffn, layers = 32, 48, 3
    embeddings = PADDED_VOCAB * d + 32 * d  # token table (also the tied head) + positions (block_size=32)
    attention = (d * 3 * d + 3 * d) + (d * d + d)  # qkv weight+bias, output projection weight+bias
    mlp = (d * ffn + ffn) + (ffn * d + d)  # fc weight+bias, proj weight+bias
    layer_norms = 2 * (d + d)  # ln_attn and ln_mlp, weight+bias each
    final_norm = d + d
    expected = embeddings + layers * (attention + mlp + layer_norms) + final_norm
    assert expected == 4096 + 1024 + 3 * (4224 + 3152 + 128) + 64 == 27696

    model = build(cfg)
    assert model.num_parameters() == expected
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("attention", ["torch_sdpa", "reference"])
def test_changing_a_token_leaves_earlier_logits_unchanged(attention):
    model = build(attention=attention).eval()
    idx = random_tokens(2, 24)
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx)[..., :VOCAB], model(changed)[..., :VOCAB]
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    # The change must be visible from position t on, or the test above proves nothing.
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-4


def test_initial_loss_is_close_to_uniform():
    model = build()
    with torch.no_grad():
        loss = model(random_tokens(4, 32, seed=1), random_tokens(4, 32, seed=2))
    # Small init makes the logits nearly equal, so cross entropy starts near ln(V); padding is masked.
    assert abs(loss.item() - math.log(VOCAB)) < 0.3


def test_gpt2_initialisation():
    cfg = tiny_config(n_layer=4, n_embd=64, ffn_hidden_size=256)
    model = build(cfg)
    std, residual_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
    params = dict(model.named_parameters())
    for name, param in params.items():
        if name.endswith("ln_attn.weight") or name.endswith("ln_mlp.weight") or name.endswith("ln_f.weight"):
            assert torch.all(param == 1), name
        elif param.dim() == 1:  # biases, LayerNorm shifts included
            assert torch.all(param == 0), name
        else:
            expected = residual_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else std
            assert param.mean().abs().item() < 0.1 * expected, name
            # >= 4096 samples each: the sample std is within ~2% of the true std at 1 sigma.
            assert param.std().item() == pytest.approx(expected, rel=0.1), name
    assert "embedding.tokens.weight" in params and "embedding.positions.weight" in params


def test_same_seed_is_bitwise_equal_and_different_seeds_differ():
    first, second, other = (dict(build(seed=seed).named_parameters()) for seed in (7, 7, 8))
    assert first.keys() == second.keys() == other.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
        if first[name].std() > 0:  # random tensors; constants (biases, LayerNorm) agree whatever the seed
            assert not torch.equal(first[name], other[name]), name


def test_each_layer_is_seeded_independently_of_depth():
    shallow = dict(build(tiny_config(n_layer=2), seed=3).named_parameters())
    deep = dict(build(tiny_config(n_layer=3), seed=3).named_parameters())
    assert set(shallow) < set(deep)
    for name, value in shallow.items():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            # The residual projections are drawn from the same numbers but scaled by 1/sqrt(2 * n_layer)
            # (GPT-2), so they agree up to that factor.
            torch.testing.assert_close(deep[name], value * math.sqrt(4 / 6), rtol=1e-6, atol=0)
        else:
            assert torch.equal(deep[name], value), name
    # ...yet each layer draws its own numbers: no two blocks start identical.
    assert not torch.equal(deep["blocks.0.attn.qkv.weight"], deep["blocks.1.attn.qkv.weight"])
    assert not torch.equal(deep["blocks.1.mlp.fc.weight"], deep["blocks.2.mlp.fc.weight"])


@pytest.mark.parametrize(
    ("reference", "fast"),
    [
        ({"attention": "reference"}, {"attention": "torch_sdpa"}),
        ({"layernorm": "reference"}, {"layernorm": "torch"}),
        ({"attention": "reference", "layernorm": "reference"}, {"attention": "auto", "layernorm": "auto"}),
    ],
)
def test_kernel_implementations_agree_on_loss_and_gradients(reference, fast):
    idx, targets = random_tokens(2, 32, seed=4), random_tokens(2, 32, seed=5)
    models = [build(seed=11, **reference), build(seed=11, **fast)]
    losses = []
    for model in models:
        loss = model(idx, targets)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p_ref), (_, p_fast) in zip(
        models[0].named_parameters(), models[1].named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_output_layer_is_tied_to_the_token_embedding():
    model = build(tiny_config(ffn_hidden_size=48))  # keep every other dimension away from 128
    table = model.embedding.tokens.weight
    vocab_sized = [name for name, p in model.named_parameters() if PADDED_VOCAB in p.shape]
    assert vocab_sized == ["embedding.tokens.weight"]
    assert [name for name, _ in model.head.named_parameters()] == ["ln_f.weight", "ln_f.bias"]

    # Feed only tokens 0..9: rows 10.. are never looked up, so any gradient they get comes from the
    # output layer; padding rows are masked out of the softmax and get none.
    idx = torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(6))
    model(idx, idx.roll(-1, dims=1)).backward()
    assert table.grad is not None
    assert torch.all(table.grad[10:VOCAB].abs().sum(dim=-1) > 0)
    assert torch.all(table.grad[VOCAB:] == 0)


def test_padding_logits_are_masked():
    model = build().eval()
    with torch.no_grad():
        logits = model(random_tokens(2, 8))
    assert torch.isneginf(logits[..., VOCAB:]).all() and torch.isfinite(logits[..., :VOCAB]).all()


def test_overfits_one_batch_with_plain_adamw():
    torch.manual_seed(0)
    model = build(seed=0)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=0))
    idx, targets = random_tokens(4, 32, seed=12), random_tokens(4, 32, seed=13)
    losses = []
    for _ in range(30):
        loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)
    # Random targets are memorisable only by overfitting: from ~4.85 nats to well under 1.
    assert losses[-1] < 1.0, losses
    assert all(math.isfinite(x) for x in losses)
