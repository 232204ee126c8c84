"""Cost model: FLOPs, memory, time and money for a run, and how the measured run compares."""

from trainer.cost.flops import model_flops_per_token

__all__ = ["model_flops_per_token"]
