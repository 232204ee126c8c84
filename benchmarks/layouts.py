"""Compare parallel layouts on one model and one global batch: `python -m benchmarks.layouts`.

Each layout (single process; data parallel at ZeRO 0-3; tensor, pipeline and combined parallelism) is
one `launch.local` run in a subprocess, all with the same model, data, seed and global batch (16
sequences: `train.grad_accum_steps` is set so that micro_batch * accum * dp stays constant). From each
run's `metrics.jsonl` it reports the median seconds per step (first steps excluded as warm-up),
tokens/s, the loss at the last step, and per rank the peak RSS and the MiB of parameters and optimizer
state held. Prints a markdown table and writes it, with CSVs, to `--out-dir`. A failed run stops the
benchmark with a non-zero exit naming the layout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 16  # sequences per optimizer step, every layout
WARMUP_STEPS = 2  # steps left out of the median

DEFAULT_MODEL = (
    "model.n_layer=4 model.n_head=8 model.n_embd=256 model.block_size=128 train.micro_batch_size=4"
)
# Small prepared corpus (prepared by the first run, reused by the rest) and quiet, checkpoint-free runs.
DATA_OVERRIDES = ["data.max_corpus_mb=2", "data.vocab_size=4096", "data.shard_max_tokens=100000"]
RUN_OVERRIDES = [
    "train.eval_interval=0", "train.eval_batches=2", "train.checkpoint_interval=0", "train.log_interval=1",
    "train.progress_bar=false", "logging.wandb=false", "train.resume=never",
]


@dataclass(frozen=True)
class Layout:
    name: str
    nproc: int
    tp: int = 1
    pp: int = 1
    zero: int = 0

    @property
    def dp(self) -> int:
        return self.nproc // (self.tp * self.pp)


LAYOUTS = [
    Layout("single", 1),
    Layout("dp2-zero0", 2, zero=0),
    Layout("dp2-zero1", 2, zero=1),
    Layout("dp2-zero2", 2, zero=2),
    Layout("dp2-zero3", 2, zero=3),
    Layout("tp2", 2, tp=2),
    Layout("pp2", 2, pp=2),
    Layout("tp2-pp2", 4, tp=2, pp=2),
    Layout("tp2-pp2-dp2-zero1", 8, tp=2, pp=2, zero=1),
]
LAYOUTS_BY_NAME = {layout.name: layout for layout in LAYOUTS}


@dataclass
class Result:
    layout: Layout
    grad_accum: int
    step_s: float
    tokens_per_s: float
    last_step: int
    last_loss: float
    num_parameters: int
    ranks: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0


class BenchmarkError(RuntimeError):
    """A layout's run failed or left no usable metrics."""


def _override(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else None


def grad_accum_for(layout: Layout, micro_batch: int) -> int:
    """Micro-batches per step so that micro_batch * accum * dp == GLOBAL_BATCH."""
    per_step = micro_batch * layout.dp
    if GLOBAL_BATCH % per_step:
        raise BenchmarkError(f"{layout.name}: global batch {GLOBAL_BATCH} is not a multiple of "
                             f"micro_batch {micro_batch} * dp {layout.dp}")
    return GLOBAL_BATCH // per_step


def trainer_overrides(layout: Layout, model: list[str], steps: int, accum: int, prepared: Path) -> list[str]:
    """The Hydra overrides every rank of this layout's run gets."""
    # The preset's 50 warm-up steps exceed a short run; a quarter of the run unless --model sets them.
    warmup = [] if _override(model, "optim.warmup_steps") else [f"optim.warmup_steps={steps // 4}"]
    return [
        f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", f"parallel.zero_stage={layout.zero}",
        *model, *warmup, f"train.grad_accum_steps={accum}", f"train.max_steps={steps}",
        *RUN_OVERRIDES, *DATA_OVERRIDES, f"data.prepared_dir={prepared}", f"train.run_name={layout.name}",
    ]


def launch_command(layout: Layout, model: list[str], steps: int, accum: int, prepared: Path) -> list[str]:
    return [sys.executable, "-m", "launch.local", f"nproc={layout.nproc}",
            *trainer_overrides(layout, model, steps, accum, prepared)]


def prepare_data(model: list[str], steps: int, work: Path) -> None:
    """Prepare the corpus once before any timed run, so no layout's run (or peak RSS) includes it."""
    from data_pipeline.prepare import ensure_prepared
    from trainer.config import ConfigError, compose_config

    layout = LAYOUTS[0]
    micro_batch = int(_override(model, "train.micro_batch_size") or 4)
    overrides = trainer_overrides(layout, model, steps, grad_accum_for(layout, micro_batch), work / "prepared")
    try:
        config = compose_config([*overrides, "train.run_dir=."])
    except ConfigError as err:
        raise BenchmarkError(f"config error: {err}") from None
    ensure_prepared(config.data)


def run_layout(layout: Layout, model: list[str], steps: int, work: Path, logs: Path) -> Result:
    """Run one layout to completion in `work` and read its metrics; raises BenchmarkError on failure."""
    micro_batch = int(_override(model, "train.micro_batch_size") or 4)
    accum = grad_accum_for(layout, micro_batch)
    command = launch_command(layout, model, steps, accum, work / "prepared")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log_path = logs / f"{layout.name}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        rc = subprocess.call(command, cwd=work, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise BenchmarkError(f"layout {layout.name} failed (exit {rc}); log {log_path}:\n{tail}")
    result = read_metrics(layout, work / "runs" / layout.name / "metrics.jsonl", micro_batch * accum * layout.dp,
                          model)
    result.grad_accum, result.wall_s = accum, wall
    return result


def read_metrics(layout: Layout, path: Path, sequences: int, model: list[str]) -> Result:
    """Median step time (after warm-up), last loss and per-rank memory from a run's metrics.jsonl."""
    if not path.is_file():
        raise BenchmarkError(f"layout {layout.name}: no metrics at {path}")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [m for m in lines if "perf/step_s" in m]
    summaries = [m["summary"] for m in lines if "summary" in m]
    if not steps or not summaries:
        raise BenchmarkError(f"layout {layout.name}: {path} has no step lines or no summary")
    timed = [m["perf/step_s"] for m in steps if m["step"] > WARMUP_STEPS] or [steps[-1]["perf/step_s"]]
    step_s = statistics.median(timed)
    block = int(_override(model, "model.block_size") or _override(model, "train.seq_len") or 0)
    seq_len = int(_override(model, "train.seq_len") or block)
    summary = summaries[-1]
    return Result(
        layout=layout, grad_accum=0, step_s=step_s,
        tokens_per_s=sequences * seq_len / step_s if seq_len else float("nan"),
        last_step=steps[-1]["step"], last_loss=steps[-1]["train/loss"],
        num_parameters=summary["num_parameters"], ranks=summary["memory_per_rank"],
    )


KEYS = (("peak_rss_mb", "peak RSS MiB", "{:.0f}"), ("params_mb", "params MiB", "{:.2f}"),
        ("optimizer_mb", "optimizer MiB", "{:.2f}"))


def _differ(values: list[str]) -> bool:
    return len(set(values)) > 1


def markdown_table(results: list[Result]) -> str:
    """One row per layout (memory as the max over ranks), then per-rank figures where ranks differ."""
    head = ["layout", "ranks", "tp", "pp", "dp", "ZeRO", "accum", "s/step (median)", "tokens/s",
            *[label + " (max)" for _, label, _ in KEYS], "loss at last step"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    details = []
    for r in results:
        lay = r.layout
        cells = [lay.name, str(lay.nproc), str(lay.tp), str(lay.pp), str(lay.dp), str(lay.zero),
                 str(r.grad_accum), f"{r.step_s:.3f}", f"{r.tokens_per_s:,.0f}"]
        for key, label, fmt in KEYS:
            cells.append(fmt.format(max(m[key] for m in r.ranks)))
            per_rank = [fmt.format(m[key]) for m in r.ranks]
            if key != "peak_rss_mb" and _differ(per_rank):
                details.append(f"- {lay.name}, {label} by rank: " + " / ".join(per_rank))
        cells.append(f"{r.last_loss:.4f} (step {r.last_step})")
        rows.append("| " + " | ".join(cells) + " |")
    rss = [f"- {r.layout.name}: " + " / ".join(f"{m['peak_rss_mb']:.0f}" for m in r.ranks)
           for r in results if len(r.ranks) > 1]
    text = "\n".join(rows)
    if details:
        text += "\n\nRanks that hold different amounts (rank 0 first):\n\n" + "\n".join(details)
    if rss:
        text += "\n\nPeak RSS MiB by rank (rank 0 first):\n\n" + "\n".join(rss)
    return text + "\n"


def write_csvs(results: list[Result], out_dir: Path) -> None:
    """layouts.csv: one row per layout (memory as max over ranks); layouts_ranks.csv: one row per rank."""
    with open(out_dir / "layouts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layout", "nproc", "tp", "pp", "dp", "zero_stage", "grad_accum_steps", "median_step_s",
                    "tokens_per_s", "max_peak_rss_mb", "max_params_mb", "max_optimizer_mb", "last_step",
                    "last_loss", "num_parameters", "wall_s"])
        for r in results:
            lay = r.layout
            w.writerow([lay.name, lay.nproc, lay.tp, lay.pp, lay.dp, lay.zero, r.grad_accum, f"{r.step_s:.4f}",
                        f"{r.tokens_per_s:.1f}", *[f"{max(m[k] for m in r.ranks):.3f}" for k, _, _ in KEYS],
                        r.last_step, f"{r.last_loss:.6f}", r.num_parameters, f"{r.wall_s:.1f}"])
    with open(out_dir / "layouts_ranks.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layout", "rank", "peak_rss_mb", "params_mb", "optimizer_mb"])
        for r in results:
            for rank, m in enumerate(r.ranks):
                w.writerow([r.layout.name, rank, *[f"{m[k]:.3f}" for k, _, _ in KEYS]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layouts", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per layout (default 8)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"Hydra overrides for the model and micro batch (default: {DEFAULT_MODEL!r})")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS_BY_NAME), metavar="LAYOUT",
                        default=list(LAYOUTS_BY_NAME),
                        help="subset to run, in this order (default all: " + ", ".join(LAYOUTS_BY_NAME) + ")")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results",
                        help="where the markdown table, CSVs and run logs go")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where runs/ and the prepared corpus go (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    return args


def run_all(layouts: list[Layout], model: list[str], steps: int, work: Path, out_dir: Path) -> list[Result]:
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[layouts] preparing the corpus in {work / 'prepared'} ...", flush=True)
    prepare_data(model, steps, work)
    results = []
    for layout in layouts:
        print(f"[layouts] {layout.name}: {layout.nproc} process(es), tp={layout.tp} pp={layout.pp} "
              f"dp={layout.dp} zero={layout.zero} ...", flush=True)
        result = run_layout(layout, model, steps, work, logs)
        print(f"[layouts] {layout.name}: {result.step_s:.3f} s/step, loss {result.last_loss:.4f} at step "
              f"{result.last_step} ({result.wall_s:.0f} s wall)", flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = shlex.split(args.model)
    layouts = [LAYOUTS_BY_NAME[name] for name in args.layouts]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.work_dir is None:
            with tempfile.TemporaryDirectory(prefix="layouts-") as tmp:
                results = run_all(layouts, model, args.steps, Path(tmp), args.out_dir)
        else:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            results = run_all(layouts, model, args.steps, args.work_dir.resolve(), args.out_dir)
    except BenchmarkError as err:
        print(f"[layouts] FAILED: {err}", file=sys.stderr)
        return 1
    table = markdown_table(results)
    print("\n" + table)
    print("Loss at the last step: " + ", ".join(f"{r.layout.name} {r.last_loss:.4f}" for r in results))
    (args.out_dir / "layouts.md").write_text(table)
    write_csvs(results, args.out_dir)
    print(f"[layouts] wrote {args.out_dir / 'layouts.md'}, layouts.csv and layouts_ranks.csv", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
