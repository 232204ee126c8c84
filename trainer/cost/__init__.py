"""Cost model: FLOPs, parameters, memory, time and money for a run, and a search over parallel layouts.

`python -m trainer.cost plan|estimate ...` prints the reports (see trainer/cost/__main__.py).
"""

from trainer.cost.budget import RunCost, chinchilla_loss, chinchilla_optimal, run_cost
from trainer.cost.flops import (
    attention_flops_per_token,
    dense_flops_per_token,
    flops_per_step,
    forward_flops_per_token,
    hardware_flops_per_token,
    model_flops_per_token,
    output_layer_flops_per_token,
    six_n_flops_per_token,
)
from trainer.cost.memory import Layout, MemoryEstimate, estimate_memory
from trainer.cost.params import ParameterCount, parameter_count
from trainer.cost.planner import Assumptions, Candidate, search_layouts, step_times

__all__ = [
    "Assumptions", "Candidate", "Layout", "MemoryEstimate", "ParameterCount", "RunCost", "attention_flops_per_token",
    "chinchilla_loss", "chinchilla_optimal", "dense_flops_per_token", "estimate_memory", "flops_per_step",
    "forward_flops_per_token", "hardware_flops_per_token", "model_flops_per_token", "output_layer_flops_per_token",
    "parameter_count", "run_cost", "search_layouts", "six_n_flops_per_token", "step_times",
]
