"""`python -m trainer.cost`: the README's GPT-3 175B plan figure by figure, the text report, bad input, imports.

The CLI runs in-process through `main()` (what `python -m trainer.cost` calls); only the import test starts an
interpreter of its own, because what a fresh interpreter imports is what it tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import CONF_DIR
from trainer.cost.__main__ import main

PLAN_175B = ["plan", "model=gpt3-175b", "hardware=a100-80gb", "gpus=1024", "tokens=300e9"]
GiB = 2**30

# GPT-3 175B (conf/model/gpt3-175b.yaml): d = n_embd, L = n_layer, A = n_head, T = seq_len = P = block_size,
# V = 50257 padded to a multiple of 128 (50304; 51200 at tp=8, a multiple of 128*8). The MLP is 4d wide.
D, L, A, T, P, V, V_TP8 = 12288, 96, 96, 2048, 2048, 50304, 51200
# conf/hardware/a100-80gb.yaml and the command line: bf16 peak, GiB, $ per GPU-hour, kW; 0.4 is the default MFU.
GPUS, PEAK, MEMORY_GIB, PRICE, TDP_KW, MFU, TOKENS = 1024, 312e12, 80, 1.5, 0.4, 0.4, 300e9
# GPT-3's batch for a model over 100B parameters is 3.2M tokens: 3.2 * 2**20 / 2048 = 1638.4 sequences,
# rounded to a multiple of 256.
GLOBAL_BATCH = 1536

# The --json figures as the code prints them, pinned at rel 1e-3. Each one that can be worked out by hand is
# also checked, to float rounding, against the working in the _by_hand_* functions below. The others are
# pinned as printed: the search's counts of runnable and non-fitting layouts, and the table's rounded columns
# (which agree with the workings).
PINNED = {
    "global_batch": 1536,
    "params.total": 174_604_836_864, "params.non_embedding": 173_961_535_488, "params.per_layer": 1_812_099_072,
    "params.token_embedding": 618_135_552, "params.position_embedding": 25_165_824,
    "flops.six_n_per_token": 1.047629e12, "flops.forward_per_token": 3.539605e11,
    "flops.model_per_token": 1.061881e12, "flops.hardware_per_token_recompute": 1.414606e12,
    "flops.model_per_step": 3.340390e18,
    # README: "3.19e23 FLOPs, 28.9 days and $1.06 M at 40% MFU".
    "cost.total_flops": 3.185644e23, "cost.seconds": 2.492773e6, "cost.days": 28.85154,
    "cost.gpu_hours": 709_055.4, "cost.dollars": 1_063_583, "cost.energy_kwh": 283_622.2,
    "chinchilla.compute": 3.142887e23, "chinchilla.optimal_params": 5.117688e10,
    "chinchilla.optimal_tokens": 1.023538e12, "chinchilla.tokens_per_param": 1.718165,
    "chinchilla.loss": 2.002335, "chinchilla.optimal_loss": 1.960982,
    "single_gpu.params": 325.2269, "single_gpu.grads": 325.2269, "single_gpu.optimizer": 1951.361,
    "single_gpu.activations": 7.555664, "single_gpu.model_states": 2601.815, "single_gpu.total": 2609.370,
    "single_gpu.headroom": -2529.370, "single_gpu.budget": 80,
    # 448 = 4 tp (1, 2, 4, 8) x [pp=1: 4 micro-batch sizes x 4 ZeRO stages x recompute on/off
    #                            + 5 pp (2 ... 32, the powers of 2 dividing 96) x 4 sizes x ZeRO 0/1 x 2] = 4 x 112.
    "layouts.considered": 448, "layouts.runnable": 80, "layouts.not_fitting": 161,
    "best.memory.params": 10.32214, "best.memory.grads": 10.32214, "best.memory.optimizer": 1.935400,
    "best.memory.activations": 32.0625, "best.memory.model_states": 22.57967, "best.memory.total": 54.64217,
    "best.memory.headroom": 25.35783, "best.memory_gib": 54.64, "best.headroom_gib": 25.36,
    "best.step_times.compute": 26.14024, "best.step_times.tp_comm": 1.352915, "best.step_times.bubble": 1.718322,
    "best.step_seconds": 29.211, "best.mfu": 0.3579, "best.tokens_per_second": 107_688.1,
    "best.cost.mfu": 0.3579448, "best.cost.days": 32.24133, "best.cost.gpu_hours": 792_362.9,
    "best.cost.dollars": 1_188_544,
}
# The fastest layout that fits: tp=8 within a node, 4 stages of 24 layers, ZeRO-1, 1536 / 32 = 48 micro-batches.
BEST_LAYOUT = {"tp": 8, "pp": 4, "dp": 32, "zero_stage": 1, "micro_batch": 1, "recompute": False,
               "sequence_parallel": True, "micro_batches": 48, "category": "best", "fits": True}
# The runners-up (tp, pp, dp, ZeRO stage, micro-batch): deeper pipelines lose a little to their bubble.
TOP_SHAPES = [(8, 4, 32, 1, 1), (8, 8, 16, 1, 1), (8, 16, 8, 1, 1), (8, 16, 8, 0, 1), (8, 32, 4, 1, 1)]


def _by_hand_params_and_flops() -> dict[str, float]:
    """Parameters (trainer/cost/params.py) and FLOPs per token (trainer/cost/flops.py), worked for 175B."""
    per_layer = 12 * D * D + 13 * D  # weights 3d^2 + d^2 + 2 * 4d^2; biases 3d + d + 4d + d; two LayerNorms 4d
    total = V * D + P * D + L * per_layer + 2 * D
    forward = L * (24 * D * D + 2 * D * T) + 2 * D * V  # dense 2*12d^2, causal attention 2dT, tied head 2dV
    return {
        "params.total": total, "params.non_embedding": L * per_layer + 2 * D, "params.token_embedding": V * D,
        "params.position_embedding": P * D, "params.per_layer": per_layer,
        "flops.six_n_per_token": 6 * total, "flops.forward_per_token": forward,
        "flops.model_per_token": 3 * forward,
        "flops.hardware_per_token_recompute": 3 * forward + L * (24 * D * D + 2 * D * T),  # blocks run twice
        "flops.model_per_step": 3 * forward * GLOBAL_BATCH * T,
    }


def _by_hand_cost_and_chinchilla(total_params: int, model_flops_per_token: float) -> dict[str, float]:
    """Time, money and energy at 40% MFU (trainer/cost/budget.py), and Chinchilla's view of the same compute."""
    total_flops = TOKENS * model_flops_per_token
    seconds = total_flops / (GPUS * PEAK * MFU)
    gpu_hours = GPUS * seconds / 3600
    compute = 6 * total_params * TOKENS
    n_opt = math.sqrt(compute / 120)  # C = 6 N (20 N)
    return {
        "cost.total_flops": total_flops, "cost.seconds": seconds, "cost.days": seconds / 86400,
        "cost.gpu_hours": gpu_hours, "cost.dollars": gpu_hours * PRICE, "cost.energy_kwh": gpu_hours * TDP_KW,
        "chinchilla.compute": compute, "chinchilla.optimal_params": n_opt, "chinchilla.optimal_tokens": 20 * n_opt,
        "chinchilla.tokens_per_param": TOKENS / total_params,
        "chinchilla.loss": _chinchilla_loss(total_params, TOKENS),
        "chinchilla.optimal_loss": _chinchilla_loss(n_opt, 20 * n_opt),
    }


def _chinchilla_loss(params: float, tokens: float) -> float:
    return 1.69 + 406.4 / params**0.34 + 410.7 / tokens**0.28  # Hoffmann et al.'s approach-3 fit


def _by_hand_single_gpu(total_params: int) -> dict[str, float]:
    """One GPU, micro-batch 1, full recompute, bf16 (trainer/cost/memory.py): 16 bytes per parameter, and more."""
    layer_inputs = L * 2 * T * D  # the bf16 input of every layer, kept for the recompute
    live_layer = T * D * (10 + 24 + 5 * A * T / D)  # the layer being recomputed, all its activations (bytes)
    loss_softmax = 4 * T * V  # fp32
    activations = layer_inputs + live_layer + loss_softmax
    total = 16 * total_params + activations
    return {
        "single_gpu.params": 2 * total_params / GiB, "single_gpu.grads": 2 * total_params / GiB,
        "single_gpu.optimizer": 12 * total_params / GiB, "single_gpu.activations": activations / GiB,
        "single_gpu.model_states": 16 * total_params / GiB, "single_gpu.total": total / GiB,
        "single_gpu.headroom": MEMORY_GIB - total / GiB, "single_gpu.budget": MEMORY_GIB,
    }


def _by_hand_best_memory() -> dict[str, float]:
    """The first of 4 stages at tp=8, sequence parallel, ZeRO-1 over dp=32, 4 micro-batches in flight."""
    layer_per_rank = 12 * D * D // 8 + (3 * D + 4 * D) // 8 + 2 * D + 4 * D  # split; row biases and norms whole
    params = 24 * layer_per_rank + V_TP8 * D // 8 + P * D  # 24 layers, a tp slice of the tokens, the positions
    layer_activations = T * D * (10 / 8 + 24 / 8 + 5 * A * T / (D * 8))  # bytes, bf16, t = t_sp = 8
    activations = 4 * 24 * layer_activations
    model_states = (2 + 2 + 12 / 32) * params
    return {
        "best.memory.params": 2 * params / GiB, "best.memory.grads": 2 * params / GiB,
        "best.memory.optimizer": 12 * params / 32 / GiB, "best.memory.activations": activations / GiB,
        "best.memory.model_states": model_states / GiB, "best.memory.total": (model_states + activations) / GiB,
        "best.memory.headroom": MEMORY_GIB - (model_states + activations) / GiB,
    }


def _by_hand_best_time(total_flops: float) -> dict[str, float]:
    """The best layout's step (trainer/cost/planner.py) and the run at the MFU it reaches."""
    tokens = GLOBAL_BATCH * T
    compute = tokens * 3 * (L * (24 * D * D + 2 * D * T) + 2 * D * V_TP8) / (GPUS * PEAK * MFU)
    # 24 layers x 48 micro-batches x 4 all-reduces of T*D bf16 values, a ring moving 2*(8-1)/8 of them.
    tp_comm = 24 * 48 * 4 * (2 * 7 / 8 * T * D * 2) / 300e9
    bubble = (compute + tp_comm) * (4 - 1) / 48
    step = compute + tp_comm + bubble
    mfu = MFU * compute / step
    seconds = total_flops / (GPUS * PEAK * mfu)
    return {
        "best.step_times.compute": compute, "best.step_times.tp_comm": tp_comm, "best.step_times.bubble": bubble,
        "best.tokens_per_second": tokens / step, "best.cost.mfu": mfu, "best.cost.days": seconds / 86400,
        "best.cost.gpu_hours": GPUS * seconds / 3600, "best.cost.dollars": GPUS * seconds / 3600 * PRICE,
    }


def _by_hand() -> dict[str, float]:
    figures = _by_hand_params_and_flops()
    total_params, per_token = figures["params.total"], figures["flops.model_per_token"]
    figures.update(_by_hand_cost_and_chinchilla(total_params, per_token))
    figures.update(_by_hand_single_gpu(total_params))
    figures.update(_by_hand_best_memory())
    figures.update(_by_hand_best_time(TOKENS * per_token))
    return figures


def _at(report: dict, path: str):
    for key in path.split("."):
        report = report[key]
    return report


def _mismatches(report: dict, expected: dict[str, float], rel: float) -> list[str]:
    return [f"{path}: {_at(report, path)!r}, expected {value!r}" for path, value in expected.items()
            if _at(report, path) != pytest.approx(value, rel=rel)]


def test_readme_plan_json_figures(capsys):
    assert main([*PLAN_175B, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert _mismatches(report, PINNED, rel=1e-3) == []
    # The workings are the formulas' own arithmetic, so they agree to float rounding.
    assert _mismatches(report, _by_hand(), rel=1e-12) == []
    assert {key: report["best"][key] for key in BEST_LAYOUT} == BEST_LAYOUT
    assert report["best"]["memory"]["stage"] == "first" and not report["single_gpu"]["fits"]
    assert report["best"]["step_times"]["recompute"] == 0 and report["best"]["step_times"]["zero3"] == 0
    assert [(c["tp"], c["pp"], c["dp"], c["zero_stage"], c["micro_batch"]) for c in report["top"]] == TOP_SHAPES


def test_readme_plan_as_text(capsys):
    assert main(PLAN_175B) == 0
    text = capsys.readouterr().out
    for needle in ("Parameters: 174,604,836,864", "28.9 days", "709,055 GPU-hours", "$1,063,583", "(3.19e+23 FLOP)",
                   "Best layout: tp=8 pp=4 dp=32 zero=1", "DOES NOT FIT", "Chinchilla", "doesn't fit: needs",
                   "pipeline bubble", "ZeRO-3 parameter gathers", "recompute's extra forward"):
        assert needle in text, needle


def test_cli_estimates_the_configs_layout(capsys):
    assert main(["estimate", "model=gpt3-1.3b", "hardware=h100-sxm", "parallel.tp=2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"]["tp"] == 2 and report["memory"]["fits"] and report["step_times"]["tp_comm"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "model=nope", "gpus=8", "tokens=1e9"], "model/nope"),
        (["plan", "hardware=cpu", "gpus=8", "tokens=1e9"], "hardware=cpu has no peak"),
        (["plan", "hardware=a100-80gb", "gpus=eight", "tokens=1e9"], "gpus='eight': must be a number"),
        (["plan", "hardware=a100-80gb", "tokens=1e9"], "plan needs gpus="),
        (["plan", "hardware=a100-80gb", "gpus=8", "tokens=1e9", "mfu=2"], "mfu=2.0: must be in (0, 1]"),
        (["launch"], "expected a command"),
        (["estimate", "model.n_head=5"], "model.n_head=5: must divide"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


HEAVY_MODULES = ("torch", "megatron", "deepspeed", "triton", "trainer.model")


def test_cli_imports_no_torch_megatron_or_deepspeed():
    # A fresh interpreter: this one has imported torch and megatron for other tests. A plan that imported them
    # took ~8 s more per call, for a cost model that is arithmetic.
    script = (
        "import contextlib, io, sys\nfrom trainer.cost.__main__ import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    status = main({PLAN_175B!r})\n"
        f"print(status, [name for name in {HEAVY_MODULES!r} if name in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(CONF_DIR).parent)
    assert result.stdout.strip() == "0 []", result.stdout + result.stderr
