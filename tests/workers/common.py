"""Shapes shared by the distributed test workers and the tests that check them."""

from trainer.config import ModelConfig


def tiny_model_config() -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16)
