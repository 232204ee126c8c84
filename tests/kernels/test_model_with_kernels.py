"""The GPT wired to the Triton kernels (run by the interpreter here) trains like the torch path."""

from __future__ import annotations

import pytest
import torch

from trainer.config import KernelsConfig, ModelConfig
from trainer.model import GPT

pytestmark = pytest.mark.usefixtures("cpu_topology")


def _loss_and_grads(kernels: KernelsConfig) -> tuple[float, dict[str, torch.Tensor]]:
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    model = GPT(config, kernels, vocab_size=64, seed=11)
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    loss = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def test_triton_kernels_in_the_model_match_the_torch_path():
    torch_loss, torch_grads = _loss_and_grads(KernelsConfig(attention="torch_sdpa", layernorm="torch"))
    triton_loss, triton_grads = _loss_and_grads(KernelsConfig(attention="triton", layernorm="triton"))
    assert triton_loss == pytest.approx(torch_loss, rel=1e-5)
    for name, grad in torch_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
