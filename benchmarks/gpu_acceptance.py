"""GPU acceptance: one command that measures what only a GPU can show and writes it down.

    python -m benchmarks.gpu_acceptance --out DIR [--wheels DIR] [--budget-s 560] [--parts a,b,...]

Sized for one H100/H200 and 10 minutes. In this order, each part in its own processes, each writing its
result into DIR/summary.json (and DIR/summary.md) before the next starts, so a part that fails or runs out of
time costs only itself:

  environment   torch, Triton and CUDA versions, the GPU, the hardware preset `hardware=auto` picks, and the
                first-use check of each Triton kernel against its torch reference (bf16, fp16);
  kernel_tests  `pytest -m gpu tests/kernels`: kernel correctness at real shapes in bf16/fp16, forward and backward;
  training      gpt3-350m and gpt3-1.3b for a few dozen steps on one GPU, with the Triton kernels and with
                the torch path (SDPA, F.layer_norm): tokens/s, MFU, peak memory, beside the cost model's
                predicted step time and memory (`python -m trainer.cost estimate`);
  attention     the attention benchmark at a reduced sweep: TFLOP/s of ours vs SDPA-flash and cuDNN, causal,
                bf16, T = 1k-16k, head dim 64 and 128 (CSV and PNG);
  layernorm     the LayerNorm benchmark: GB/s of ours vs torch and a device-to-device copy (CSV and PNG).

DIR/summary.md is a markdown table for the README's results, with the targets beside the figures.

Packages: the machine's own CUDA torch and Triton are used. What else the engine needs (DeepSpeed,
megatron-core, Hydra, webdataset, ...) is imported from the environment if it is there; otherwise from
`--wheels DIR` (built where pip works by `python -m benchmarks.gpu_wheels --into DIR`), installed with
--no-deps into DIR_OUT/site; with neither, `make setup VENV=DIR_OUT/venv` builds a fresh venv (a CUDA torch
from PyPI, DeepSpeed without JIT ops) when the network allows it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("environment", "kernel_tests", "training", "attention", "layernorm")
# Seconds each part may take at most (the run's budget cuts them further): a lent machine runs one command for
# at most 10 minutes, its start included in the session's 15.
PART_LIMITS = {"environment": 120, "kernel_tests": 120, "training": 300, "attention": 90, "layernorm": 45}
ENGINE_MODULES = ("deepspeed", "megatron.core", "hydra", "omegaconf", "webdataset", "pydantic")
MODELS = {"gpt3-350m": 8, "gpt3-1.3b": 8}  # model preset -> micro-batch (sequences of 2048 tokens)
KERNEL_PATHS = {
    "triton": ["kernels.attention=triton", "kernels.layernorm=triton"],
    "torch": ["kernels.attention=torch_sdpa", "kernels.layernorm=torch"],
}
TRAIN_STEPS = 30
LOG_INTERVAL = 5
WARMUP_INTERVALS = 2  # logged intervals left out of the medians: autotuning, allocator warm-up
CORPUS_MB = 24  # the stdlib corpus' default: enough text for a 50,257-token BPE vocabulary (8 MB is not)
DATA_OVERRIDES = [f"data.max_corpus_mb={CORPUS_MB}", "data.prepare=auto"]
# The issue's targets, recorded beside the figures (not asserted).
TARGETS = {
    "layernorm_copy_fraction": 0.85,
    "attention_vs_flash": 1.0,
    "mfu_1.3b": 0.45,
    "step_time_error": 0.15,
    "memory_error": 0.10,
}


class PartFailed(RuntimeError):
    """A part could not produce its result; the message says why, in one line."""


@dataclass
class Context:
    """Where a part writes, which Python runs the engine, its environment, and when time is up."""

    out: Path
    python: str
    env: dict
    deadline: float
    models: dict = field(default_factory=lambda: dict(MODELS))
    steps: int = TRAIN_STEPS
    hardware: str = "auto"

    part_deadline: float = 0.0  # set when a part starts: its own limit, within the run's budget

    def start_part(self, part: str) -> None:
        self.part_deadline = min(time.monotonic() + PART_LIMITS[part], self.deadline)

    def seconds_left(self) -> float:
        return self.part_deadline - time.monotonic()

    def run(self, args: list[str], log_name: str, timeout: float, capture: bool = False) -> str:
        """Run a command in the repo, its output appended to DIR/logs/<log_name>.log (its stdout returned
        instead with `capture`); raise PartFailed on failure."""
        log_path = self.out / "logs" / f"{log_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if timeout <= 5:
            raise PartFailed(f"no time left for {shlex.join(args[:4])} ...")
        with log_path.open("a") as log:
            log.write(f"$ {shlex.join(args)}\n")
            log.flush()
            try:
                done = subprocess.run(args, cwd=REPO, env=self.env, stdout=subprocess.PIPE if capture else log,
                                      stderr=log if capture else subprocess.STDOUT, timeout=timeout, text=True)
            except subprocess.TimeoutExpired:
                raise PartFailed(f"{shlex.join(args[:4])} ... ran past {timeout:.0f} s (log: {log_path})") from None
        if done.returncode != 0:
            raise PartFailed(f"{shlex.join(args[:4])} ... exited {done.returncode}: {last_line(log_path)} "
                             f"(log: {log_path})")
        return done.stdout or ""


def last_line(path: Path) -> str:
    """The last non-empty line of a log (where a Python error says what went wrong)."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


# ----------------------------------------------------------------------------------------------------------
# Packages
# ----------------------------------------------------------------------------------------------------------


def missing_modules(python: str, env: dict) -> list[str]:
    """The engine's modules that `python` cannot import."""
    probe = ("import importlib.util, sys; "
             f"print(' '.join(m for m in {ENGINE_MODULES!r} if importlib.util.find_spec(m.split('.')[0]) is None))")
    done = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return done.stdout.split()


def install_wheels(wheels: Path, site: Path, env: dict) -> dict:
    """Install every wheel in `wheels` with --no-deps into `site`; the environment with it on PYTHONPATH."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise PartFailed(f"--wheels {wheels}: no .whl files there (python -m benchmarks.gpu_wheels --into {wheels})")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *map(str, found)], check=True)
    return with_pythonpath(env, site)


def with_pythonpath(env: dict, *paths: Path) -> dict:
    parts = [str(p) for p in paths] + [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(env, PYTHONPATH=os.pathsep.join(parts))


def engine_python(out: Path, wheels: Path | None) -> tuple[str, dict, str]:
    """(python, environment, how the packages were found) able to import the training engine."""
    env = with_pythonpath(dict(os.environ, DS_BUILD_OPS="0", WANDB_MODE="offline"))
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("DS_ACCELERATOR", "cuda" if shutil.which("nvidia-smi") else "cpu")  # as the Makefile does
    missing = missing_modules(sys.executable, env)
    if not missing:
        return sys.executable, env, "already installed"
    if wheels is not None:
        env = install_wheels(wheels, out / "site", env)
        still = missing_modules(sys.executable, env)
        if still:
            raise PartFailed(f"after installing {wheels}: still cannot import {', '.join(still)}")
        return sys.executable, env, f"wheels from {wheels} (missing: {', '.join(missing)})"
    venv = out / "venv"
    subprocess.run(["make", "setup", f"VENV={venv}"], cwd=REPO, check=True)
    return str(venv / "bin" / "python"), env, f"make setup VENV={venv} (missing: {', '.join(missing)})"


# ----------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------

ENVIRONMENT_PROBE = "import json, benchmarks.gpu_acceptance as a; print(json.dumps(a.environment_report()))"


def environment_report() -> dict:
    """Versions, the GPU, the hardware preset hardware=auto resolves to, and the kernels' first-use checks."""
    import torch
    import triton

    report = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "gpu": None}
    if not torch.cuda.is_available():
        raise PartFailed("torch sees no CUDA device")
    props = torch.cuda.get_device_properties(0)
    report["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}
    report["hardware_preset"] = detected_hardware_preset()
    report["kernel_checks"] = kernel_checks(torch)
    return report


def detected_hardware_preset() -> str | None:
    from trainer.hardware import detect_hardware

    return detect_hardware().name


# The variants the training runs compile (gpt3-350m: 1024 wide, 16 heads of 64; gpt3-1.3b: 2048 wide, 32 heads
# of 64; bf16) and a few more; each attention variant compiles and autotunes every tile once (Triton's disk
# cache keeps them for the parts after this one).
KERNEL_VARIANTS = {
    "attention d64 bf16": ("attention", "bfloat16", {"head_dim": 64}),
    "attention d128 bf16": ("attention", "bfloat16", {"head_dim": 128}),
    "attention d64 fp16": ("attention", "float16", {"head_dim": 64}),
    "layernorm 1024 bf16": ("layernorm", "bfloat16", {"width": 1024}),
    "layernorm 2048 bf16": ("layernorm", "bfloat16", {"width": 2048}),
    "rmsnorm 2048 bf16": ("rmsnorm", "bfloat16", {"width": 2048}),
}


def kernel_checks(torch) -> dict:
    """variant -> whether the Triton kernel matched its torch reference on this GPU (kernels.validation)."""
    from kernels.validation import triton_validated

    return {name: triton_validated(kernel, "cuda", getattr(torch, dtype), **variant)
            for name, (kernel, dtype, variant) in KERNEL_VARIANTS.items()}


def part_environment(ctx: Context) -> dict:
    printed = ctx.run([ctx.python, "-c", ENVIRONMENT_PROBE], "environment", ctx.seconds_left(),
                      capture=True)
    return json.loads(printed.strip().splitlines()[-1])


def part_kernel_tests(ctx: Context) -> dict:
    junit = ctx.out / "pytest-gpu.xml"
    args = [ctx.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
            "tests/kernels"]  # where every gpu test is; other modules import what a GPU image may lack
    try:
        ctx.run(args, "kernel_tests", ctx.seconds_left())
    except PartFailed as failed:
        if not junit.exists():
            raise
        return junit_summary(junit) | {"error": str(failed)}
    return junit_summary(junit)


def junit_summary(path: Path) -> dict:
    """Counts of a pytest JUnit XML file and the names of the tests that failed."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts | {"failed": failed}


def part_training(ctx: Context) -> dict:
    runs = {}
    for model, micro_batch in ctx.models.items():
        data_dir = prepared_corpus(ctx, model_vocab_size(model))
        for kernels in KERNEL_PATHS:
            name = f"{model}-{kernels}"
            try:
                runs[name] = train_one(ctx, model, micro_batch, kernels, data_dir)
            except PartFailed as failed:
                runs[name] = {"error": str(failed)}
            write_partial(ctx, "training", runs)
    failed = [name for name, run in runs.items() if "error" in run]
    if failed:
        raise PartFailed(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}")
    return runs


def model_vocab_size(model: str) -> int:
    """The vocabulary of a model preset (conf/model/<model>.yaml), which its corpus is tokenized for."""
    import yaml

    path = REPO / "conf" / "model" / f"{model}.yaml"
    if not path.exists():
        raise PartFailed(f"--models: no preset {path.relative_to(REPO)}")
    return int(yaml.safe_load(path.read_text())["vocab_size"])


def prepared_corpus(ctx: Context, vocab_size: int) -> Path:
    """The standard library corpus tokenized for `vocab_size` (prepared once, shared by the runs)."""
    data_dir = ctx.out / "data" / f"stdlib-v{vocab_size}"
    ctx.run([ctx.python, "-m", "data_pipeline.prepare", "--out", str(data_dir), "--vocab-size", str(vocab_size),
             "--max-corpus-mb", str(CORPUS_MB), "--workers", "8", "--prepare", "auto"], "training", ctx.seconds_left())
    return data_dir


def train_overrides(model: str, micro_batch: int, data_dir: Path, hardware: str) -> list[str]:
    """The Hydra overrides a training run and its cost estimate share."""
    return [f"model={model}", f"train.micro_batch_size={micro_batch}", "train.grad_accum_steps=1",
            f"hardware={hardware}", f"data.prepared_dir={data_dir}", *DATA_OVERRIDES]


def train_one(ctx: Context, model: str, micro_batch: int, kernels: str, data_dir: Path) -> dict:
    """Train one model with one kernel path; measured figures beside the cost model's prediction."""
    run_dir = ctx.out / "runs" / f"{model}-{kernels}"
    shared = train_overrides(model, micro_batch, data_dir, ctx.hardware)
    ctx.run([ctx.python, "-m", "trainer.pretrain", *shared, *KERNEL_PATHS[kernels],
             f"train.max_steps={ctx.steps}", f"train.log_interval={LOG_INTERVAL}", "train.eval_interval=0",
             "train.eval_batches=2", "train.checkpoint_interval=0", "train.final_checkpoint=false",
             "train.resume=never", "logging.wandb=false", f"optim.warmup_steps={min(10, ctx.steps)}",
             "train.progress_bar=false", f"train.run_name={model}-{kernels}", f"hydra.run.dir={run_dir}"],
            "training", ctx.seconds_left())
    measured = metrics_summary(run_dir / "metrics.jsonl")
    estimate = ctx.run([ctx.python, "-m", "trainer.cost", "estimate", *shared, "--json"], "training",
                       min(60, ctx.seconds_left()), capture=True)
    predicted = predicted_figures(json.loads(estimate))
    return measured | predicted | compare(measured, predicted)


def metrics_summary(path: Path) -> dict:
    """Medians over the logged intervals after warm-up, the first and last loss, and the peak device memory."""
    rows, summary = [], {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "summary" in record:
            summary = record["summary"]
        elif "perf/tokens_per_s" in record:
            rows.append(record)
    if not rows:
        raise PartFailed(f"{path}: no step was logged")
    steady = rows[WARMUP_INTERVALS:] or rows[-1:]
    ranks = summary.get("memory_per_rank", [{}])
    peak_mb = max(rank.get("device_peak_mb", 0.0) for rank in ranks)
    return {
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
        "step_s": statistics.median(r["perf/step_s"] for r in steady),
        "mfu": statistics.median(r.get("cost/mfu", float("nan")) for r in steady),
        "loss_first": rows[0]["train/loss"],
        "loss_last": rows[-1]["train/loss"],
        "peak_memory_gib": peak_mb / 1024,
    }


def predicted_figures(estimate: dict) -> dict:
    """The cost model's step time and memory per GPU from `trainer.cost estimate --json`."""
    step_times = estimate.get("step_times")  # absent where the hardware has no peak
    return {
        "predicted_step_s": sum(step_times.values()) if step_times else None,
        "predicted_memory_gib": estimate["memory"]["total"],
    }


def compare(measured: dict, predicted: dict) -> dict:
    """Relative errors of the prediction against the measurement (positive: the model predicted too much)."""
    def error(key_measured: str, key_predicted: str) -> float | None:
        if predicted.get(key_predicted) is None or not measured.get(key_measured):
            return None
        return predicted[key_predicted] / measured[key_measured] - 1.0

    return {"step_time_error": error("step_s", "predicted_step_s"),
            "memory_error": error("peak_memory_gib", "predicted_memory_gib")}


def part_attention(ctx: Context) -> dict:
    results = {}
    for head_dim in (128, 64):
        folder = ctx.out / "attention"
        ctx.run([ctx.python, "-m", "kernels.benchmarks.attention", "--head-dim", str(head_dim), "--mode", "fwd+bwd",
                 "--seq-lens", "1024,4096,16384", "--out", str(folder)], "attention", ctx.seconds_left())
        results[f"d{head_dim}"] = read_sweep(folder / f"attention-causal-fwd-bwd-d{head_dim}-bf16.csv")
        write_partial(ctx, "attention", results)
    return results


def part_layernorm(ctx: Context) -> dict:
    folder = ctx.out / "layernorm"
    ctx.run([ctx.python, "-m", "kernels.benchmarks.layernorm", "--mode", "forward+backward", "--dtype", "bf16",
             "--out", str(folder)], "layernorm", ctx.seconds_left())
    return {"forward+backward": read_sweep(next(folder.glob("*forward-backward*.csv")))}


def read_sweep(path: Path) -> list[dict]:
    """A triton.testing.perf_report CSV as rows of {column: number}."""
    with path.open() as f:
        return [{key: float(value) if value not in ("", "nan") else None for key, value in row.items()}
                for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------

PART_FUNCTIONS = {"environment": part_environment, "kernel_tests": part_kernel_tests, "training": part_training,
                  "attention": part_attention, "layernorm": part_layernorm}


def write_partial(ctx: Context, part: str, result: dict) -> None:
    """Record a part's results so far (a later failure or time-out keeps them)."""
    summary = read_summary(ctx.out)
    summary["parts"][part] = {"status": "running", "result": result}
    write_summary(ctx.out, summary)


def read_summary(out: Path) -> dict:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {"parts": {}}


def write_summary(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(out / "summary.json")
    (out / "summary.md").write_text(markdown_summary(summary))


def run_part(ctx: Context, part: str) -> dict:
    """Run one part; its status, seconds and result (or error) whatever happens."""
    started = time.monotonic()
    try:
        if ctx.deadline - started < 10:
            raise PartFailed("skipped: the run's time budget is spent")
        ctx.start_part(part)
        outcome = {"status": "ok", "result": PART_FUNCTIONS[part](ctx)}
    except PartFailed as failed:
        outcome = {"status": "failed", "error": str(failed)}
    except Exception as exc:  # noqa: BLE001 - a part's bug must not cost the parts after it
        outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    partial = read_summary(ctx.out)["parts"].get(part, {}).get("result")
    if outcome["status"] == "failed" and partial:
        outcome["result"] = partial
    return outcome | {"seconds": round(time.monotonic() - started, 1)}


def markdown_summary(summary: dict) -> str:
    """The results as markdown: the machine, the part statuses, then each part's figures with the targets."""
    parts = summary.get("parts", {})
    lines = [f"# GPU acceptance ({summary.get('started', '?')})", ""]
    env = parts.get("environment", {}).get("result") or {}
    if env.get("gpu"):
        gpu = env["gpu"]
        lines += [f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['memory_gib']} GiB); torch "
                  f"{env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}; hardware=auto -> "
                  f"{env.get('hardware_preset')}; kernel checks: {env.get('kernel_checks')}", ""]
    lines += ["| part | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {p.get('status')}{': ' + p['error'] if p.get('error') else ''} | {p.get('seconds', '')} |"
              for name, p in parts.items()]
    lines += training_table(parts.get("training", {}).get("result") or {})
    lines += kernel_tests_lines(parts.get("kernel_tests", {}).get("result") or {})
    lines += attention_table(parts.get("attention", {}).get("result") or {})
    lines += layernorm_table(parts.get("layernorm", {}).get("result") or {})
    return "\n".join(lines) + "\n"


def training_table(runs: dict) -> list[str]:
    if not runs:
        return []
    lines = ["", f"Training (one GPU, bf16; targets: 1.3B MFU >= {TARGETS['mfu_1.3b']:.0%}, predicted step time "
             f"within {TARGETS['step_time_error']:.0%}, memory within {TARGETS['memory_error']:.0%})", "",
             "| run | tokens/s | MFU | step s (predicted) | peak GiB (predicted) | loss first -> last |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['step_s']:.3f} "
                     f"({_maybe(r.get('predicted_step_s'), '.3f')}) | {r['peak_memory_gib']:.1f} "
                     f"({_maybe(r.get('predicted_memory_gib'), '.1f')}) | {r['loss_first']:.3f} -> "
                     f"{r['loss_last']:.3f} |")
    return lines


def kernel_tests_lines(result: dict) -> list[str]:
    if not result:
        return []
    line = (f"pytest -m gpu: {result.get('passed', 0)} passed, {result.get('failures', 0)} failed, "
            f"{result.get('errors', 0)} errors, {result.get('skipped', 0)} skipped")
    return ["", line] + [f"- failed: {name}" for name in result.get("failed", [])]


OURS, FLASH, CUDNN = "Triton (ours)", "SDPA flash", "SDPA cuDNN"
LN_TORCH, COPY = "F.layer_norm", "copy (roofline)"


def attention_table(result: dict) -> list[str]:
    """TFLOP/s per head dim and sequence length, and ours over SDPA-flash (target >= 1.0 at 4k-16k, hd 128)."""
    if not result:
        return []
    lines = ["", f"Attention forward+backward, causal, bf16, TFLOP/s (target: ours / flash >= "
             f"{TARGETS['attention_vs_flash']:.1f} at T = 4k-16k, head dim 128)", "",
             "| head dim | T | ours | SDPA flash | SDPA cuDNN | ours / flash |", "| --- | --- | --- | --- | --- | --- |"]
    for head_dim, rows in result.items():
        for row in rows:
            lines.append(f"| {head_dim.removeprefix('d')} | {row['T']:.0f} | {_maybe(row.get(OURS), '.0f')} | "
                         f"{_maybe(row.get(FLASH), '.0f')} | {_maybe(row.get(CUDNN), '.0f')} | "
                         f"{_maybe(_ratio(row.get(OURS), row.get(FLASH)), '.2f')} |")
    return lines


def layernorm_table(result: dict) -> list[str]:
    """GB/s per row width, ours against torch and the copy (target >= 85% of the copy and faster than torch)."""
    rows = result.get("forward+backward") or []
    if not rows:
        return []
    lines = ["", f"LayerNorm forward+backward, bf16, 4096 rows, GB/s (target: ours >= "
             f"{TARGETS['layernorm_copy_fraction']:.0%} of the copy, faster than torch)", "",
             "| N | ours | F.layer_norm | copy | ours / copy | ours / torch |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['N']:.0f} | {_maybe(row.get(OURS), '.0f')} | {_maybe(row.get(LN_TORCH), '.0f')} | "
                     f"{_maybe(row.get(COPY), '.0f')} | {_maybe(_ratio(row.get(OURS), row.get(COPY)), '.0%')} | "
                     f"{_maybe(_ratio(row.get(OURS), row.get(LN_TORCH)), '.2f')} |")
    return lines


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _maybe(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for summary.json, summary.md, logs, CSV and PNG")
    parser.add_argument("--wheels", default=None, help="folder of wheels to install from when packages are missing")
    parser.add_argument("--budget-s", type=float, default=560.0, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--models", default=",".join(MODELS), help="model presets to train (micro-batch 8)")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS, help="training steps per run")
    parser.add_argument("--hardware", default="auto", help="hardware preset of the runs and estimates")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": shlex.join(sys.argv), "parts": {}}
    write_summary(out, summary)
    try:
        python, env, packages = engine_python(out, Path(args.wheels) if args.wheels else None)
    except (PartFailed, subprocess.CalledProcessError) as failed:
        summary["packages"] = f"failed: {failed}"
        write_summary(out, summary)
        print(f"gpu_acceptance: cannot set up the packages: {failed}", file=sys.stderr)
        return 1
    summary["packages"] = packages
    write_summary(out, summary)
    models = {m: MODELS.get(m, 8) for m in args.models.split(",") if m}
    ctx = Context(out=out, python=python, env=env, deadline=deadline, models=models, steps=args.steps,
                  hardware=args.hardware)
    for part in args.parts.split(","):
        print(f"gpu_acceptance: {part} ...", flush=True)
        summary["parts"][part] = run_part(ctx, part)
        write_summary(out, summary)
        print(f"gpu_acceptance: {part}: {summary['parts'][part]['status']} "
              f"({summary['parts'][part]['seconds']} s)", flush=True)
    print((out / "summary.md").read_text())
    return 0 if all(p["status"] == "ok" for p in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
