"""The `plan` and `estimate` reports: plain dicts (the --json output) and their text rendering."""

from __future__ import annotations

from dataclasses import asdict

from trainer.config import Config
from trainer.cost.budget import chinchilla_loss, chinchilla_optimal, run_cost
from trainer.cost.flops import (
    forward_flops_per_token,
    hardware_flops_per_token,
    model_flops_per_token,
    six_n_flops_per_token,
)
from trainer.cost.memory import Layout, estimate_memory
from trainer.cost.params import parameter_count
from trainer.cost.planner import Assumptions, search_layouts, step_times
from trainer.vocab import padded_vocab_size

# GPT-3's batch sizes in tokens by model size (Brown et al. 2020, table 2.1): (up to N parameters, tokens).
GPT3_BATCH_TOKENS = ((1e9, 0.5 * 2**20), (5e9, 2**20), (100e9, 2 * 2**20), (float("inf"), 3.2 * 2**20))


def vocab_size(config: Config) -> int:
    """The tokenizer's vocabulary, as the model preset fixes it (training refuses data with another)."""
    return config.model.vocab_size


def default_global_batch(num_parameters: float, seq_len: int) -> int:
    """GPT-3's batch for this size in sequences, rounded to a multiple of 256 (GPT-3 175B at 2048: 1536)."""
    tokens = next(batch for limit, batch in GPT3_BATCH_TOKENS if num_parameters <= limit)
    return max(256, 256 * round(tokens / seq_len / 256))


def config_layout(config: Config) -> Layout:
    """The layout the config describes; bf16 mixed precision unless fp32 is asked for or the hardware is a CPU
    (a GPU without a preset has its memory but no peak)."""
    precision = config.train.precision
    hardware = config.hardware
    on_gpu = hardware.name != "cpu" and (hardware.peak_flops > 0 or hardware.memory_gb > 0)
    bf16 = precision in ("bf16", "fp16") or (precision == "auto" and on_gpu)
    p = config.parallel
    return Layout(tp=p.tp, pp=p.pp, dp=p.dp, zero_stage=p.zero_stage, micro_batch=config.train.micro_batch_size,
                  seq_len=config.seq_len, recompute=config.train.activation_checkpointing,
                  sequence_parallel=p.sequence_parallel, precision="bf16" if bf16 else "fp32",
                  micro_batches=config.train.grad_accum_steps,
                  flash_attention=bf16 and config.kernels.attention in ("auto", "triton"),
                  lora_rank=config.finetune.lora.rank, lora_targets=tuple(config.finetune.lora.targets))


def _model_section(config: Config, tp: int = 1) -> tuple[dict, dict, int]:
    model, vocab = config.model, vocab_size(config)
    padded = padded_vocab_size(vocab, model.pad_vocab_to_multiple, tp)
    count = parameter_count(model, vocab, tp)
    seq_len = config.seq_len
    params = {"total": count.total, "non_embedding": count.non_embedding, "token_embedding": count.token_embedding,
              "position_embedding": count.position_embedding, "per_layer": count.per_layer}
    flops = {"six_n_per_token": six_n_flops_per_token(count.total),
             "forward_per_token": forward_flops_per_token(model, padded, seq_len),
             "model_per_token": model_flops_per_token(model, padded, seq_len),
             "hardware_per_token_recompute": hardware_flops_per_token(model, padded, seq_len, True)}
    return params, flops, padded


def plan_report(config: Config, gpus: int, tokens: float, mfu: float = 0.4, global_batch: int | None = None,
                top: int = 5) -> dict:
    """FLOPs, parameters, time and money, the Chinchilla view and the best layouts for `gpus` GPUs."""
    model, hardware, seq_len = config.model, config.hardware, config.seq_len
    params, flops, padded = _model_section(config)
    global_batch = global_batch or default_global_batch(params["total"], seq_len)
    flops["model_per_step"] = flops["model_per_token"] * global_batch * seq_len
    assumptions = Assumptions(base_mfu=mfu)
    candidates = search_layouts(model, vocab_size(config), hardware, gpus, global_batch, seq_len,
                                assumptions=assumptions)
    runnable = [c for c in candidates if c.blocked is None]
    cost = run_cost(tokens, flops["model_per_token"], hardware, gpus, mfu)
    n_opt, d_opt = chinchilla_optimal(6 * params["total"] * tokens)
    report = {
        "model": {**asdict(model), "seq_len": seq_len, "padded_vocab_size": padded},
        "hardware": asdict(hardware), "gpus": gpus, "tokens": tokens, "mfu": mfu, "global_batch": global_batch,
        "params": params, "flops": flops,
        "cost": _cost_dict(cost),
        "chinchilla": {"compute": 6 * params["total"] * tokens, "optimal_params": n_opt, "optimal_tokens": d_opt,
                       "tokens_per_param": tokens / params["total"], "loss": chinchilla_loss(params["total"], tokens),
                       "optimal_loss": chinchilla_loss(n_opt, d_opt)},
        "single_gpu": _single_gpu(config),
        "layouts": {"considered": len(candidates), "runnable": len(runnable),
                    "not_fitting": sum(c.category == "memory" for c in candidates)},
        "best": None, "top": [c.as_dict() for c in runnable[:top]], "rejected": _rejected(candidates, top),
    }
    if runnable:
        best = runnable[0]
        report["best"] = {**best.as_dict(), "memory": best.memory.as_gib(),
                          "step_times": best.times, "tokens_per_second": global_batch * seq_len / best.step_seconds,
                          "cost": _cost_dict(run_cost(tokens, flops["model_per_token"], hardware, gpus, best.mfu))}
    return report


def _cost_dict(cost) -> dict:
    return {**asdict(cost), "days": cost.days}


def _single_gpu(config: Config) -> dict:
    """The leanest one-GPU layout (micro-batch 1, full recompute): does the model fit on one device at all?"""
    layout = Layout(seq_len=config.seq_len, recompute=True)
    return estimate_memory(config.model, vocab_size(config), layout, config.hardware).as_gib()


def _rejected(candidates, top: int) -> list[dict]:
    """The best-ranked loser of each kind (not in the top list): one example per reason."""
    runnable = [c for c in candidates if c.blocked is None]
    losers = runnable[top:] + [c for c in candidates if c.blocked]
    seen, picked = set(), []
    for candidate in losers:
        if candidate.category not in seen:
            seen.add(candidate.category)
            picked.append(candidate.as_dict())
    return picked


def estimate_report(config: Config, mfu: float = 0.4) -> dict:
    """The config's own layout: memory per GPU with its verdict, FLOPs and, with a peak, the step time."""
    layout = config_layout(config)
    params, flops, padded = _model_section(config, layout.tp)
    memory = estimate_memory(config.model, vocab_size(config), layout, config.hardware)
    report = {"model": {**asdict(config.model), "seq_len": layout.seq_len, "padded_vocab_size": padded},
              "hardware": asdict(config.hardware), "layout": asdict(layout), "params": params, "flops": flops,
              "memory": memory.as_gib(), "step_times": None}
    if config.hardware.peak_flops > 0:
        global_batch = layout.dp * layout.micro_batch * (layout.micro_batches or 1)
        report["step_times"] = step_times(config.model, vocab_size(config), config.hardware, layout, global_batch,
                                          Assumptions(base_mfu=mfu))
    return report


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _memory_lines(memory: dict) -> list[str]:
    verdict = (f"fits, {memory['headroom']:.1f} GiB to spare" if memory["fits"]
               else f"DOES NOT FIT: {-memory['headroom']:.1f} GiB over")
    if memory["budget"] == 0:
        verdict = "no verdict: hardware.memory_gb is 0"
    return [f"  params {memory['params']:.2f}  grads {memory['grads']:.2f}  optimizer {memory['optimizer']:.2f}  "
            f"activations {memory['activations']:.2f}  = {memory['total']:.2f} GiB of {memory['budget']:.0f} GiB "
            f"({memory['stage']} stage): {verdict}"]


def _layout_line(c: dict) -> str:
    shape = (f"tp={c['tp']} pp={c['pp']} dp={c['dp']} zero={c['zero_stage']} mb={c['micro_batch']} "
             f"recompute={'on' if c['recompute'] else 'off'}")
    step = f"{c['step_seconds']:.2f} s/step, MFU {c['mfu']:.1%}" if c["step_seconds"] else "-"
    return f"  {shape:<58} {c['memory_gib']:7.1f} GiB  {step:<26} {c['reason']}"


def format_plan(r: dict) -> str:
    """The plan report as text."""
    m, hw, p, f, cost, ch = r["model"], r["hardware"], r["params"], r["flops"], r["cost"], r["chinchilla"]
    lines = [
        f"Plan: {m['name']} on {r['gpus']} x {hw['name']}, {_si(r['tokens'])} tokens, "
        f"global batch {r['global_batch']} x {m['seq_len']}, assumed MFU {r['mfu']:.0%}",
        f"Parameters: {p['total']:,} ({p['non_embedding']:,} non-embedding)",
        f"FLOPs/token: 6N {_si(f['six_n_per_token'])}, exact {_si(f['model_per_token'])} "
        f"(forward {_si(f['forward_per_token'])}; with recompute {_si(f['hardware_per_token_recompute'])}); "
        f"per step {_si(f['model_per_step'])}",
        f"Time at {r['mfu']:.0%} MFU: {cost['days']:.1f} days, {cost['gpu_hours']:,.0f} GPU-hours, "
        f"${cost['dollars']:,.0f}" + (f", {cost['energy_kwh']:,.0f} kWh" if cost["energy_kwh"] else "")
        + f" ({cost['total_flops']:.3g} FLOP)",
        f"Chinchilla: C = 6ND = {ch['compute']:.3g} FLOP is compute-optimal at N = {_si(ch['optimal_params'])}, "
        f"D = {_si(ch['optimal_tokens'])} tokens; this run has {ch['tokens_per_param']:.1f} tokens/param; "
        f"fitted loss {ch['loss']:.3f} (optimal {ch['optimal_loss']:.3f})",
        "One GPU (micro-batch 1, full recompute):", *_memory_lines(r["single_gpu"]),
    ]
    best = r["best"]
    if best is None:
        lines.append(f"No layout of {r['layouts']['considered']} runs on {r['gpus']} GPUs; closest:")
    else:
        bc = best["cost"]
        lines += [f"Best layout: tp={best['tp']} pp={best['pp']} dp={best['dp']} zero={best['zero_stage']} "
                  f"mb={best['micro_batch']} recompute={'on' if best['recompute'] else 'off'} "
                  f"sp={'on' if best['sequence_parallel'] else 'off'}: {best['step_seconds']:.2f} s/step, "
                  f"estimated MFU {best['mfu']:.1%}, {bc['days']:.1f} days, ${bc['dollars']:,.0f}",
                  *_memory_lines(best["memory"]),
                  f"Top layouts ({r['layouts']['runnable']} of {r['layouts']['considered']} run; "
                  f"{r['layouts']['not_fitting']} do not fit):", *map(_layout_line, r["top"])]
    lines += ["Why others lose (one example per reason):", *map(_layout_line, r["rejected"])]
    return "\n".join(lines)


def format_estimate(r: dict) -> str:
    """The estimate report as text."""
    m, lay, p, f = r["model"], r["layout"], r["params"], r["flops"]
    lines = [f"Estimate: {m['name']} on {r['hardware']['name']}, tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} "
             f"zero={lay['zero_stage']} mb={lay['micro_batch']} x {lay['seq_len']} "
             f"recompute={'on' if lay['recompute'] else 'off'} {lay['precision']}"
             + (f" LoRA rank {lay['lora_rank']} on {','.join(lay['lora_targets'])} (base frozen)" if lay["lora_rank"]
                else ""),
             f"Parameters: {p['total']:,}; FLOPs/token {_si(f['model_per_token'])} (6N {_si(f['six_n_per_token'])})",
             "Memory per GPU (GiB):", *_memory_lines(r["memory"])]
    if r["step_times"]:
        total = sum(r["step_times"].values())
        parts = ", ".join(f"{k} {v:.3g}" for k, v in r["step_times"].items() if v)
        lines.append(f"Step time estimate: {total:.3g} s ({parts})")
    return "\n".join(lines)
