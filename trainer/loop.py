"""The step loop shared by pretraining and fine-tuning: step, log, evaluate, checkpoint, repeat."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data_pipeline.stream import skipped_shards
from trainer.config import Config
from trainer.cost.reconcile import Reconciler
from trainer.engine import Batch, Engine, StepResult
from trainer.metrics import MetricsSink
from trainer.parallel.topology import Topology
from trainer.preemption import PreemptionWatch

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """How far training has come; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0


@dataclass
class LoopResult:
    """What this process's share of the run measured."""

    train_losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    tokens_trained: int = 0
    # The signal that stopped the run early (see trainer/preemption.py), if one did.
    preempted_by: str | None = None


class TrainingDiverged(RuntimeError):
    """Training cannot go on: too many steps in a row had a non-finite gradient norm or loss."""


class _SkipCounter:
    """Steps skipped for non-finite values: each one logged, counted per report, too many in a row fatal."""

    def __init__(self, limit: int, announce: bool):
        self.limit = limit
        self.announce = announce  # rank 0 speaks for the job (every rank skips alike)
        self.in_a_row = 0
        self.since_report = 0

    def record(self, step: int, stats: StepResult) -> None:
        """Count `step` if it was skipped, with a WARNING naming it."""
        if not stats.skipped:
            if not math.isfinite(stats.loss):  # DeepSpeed applied an update it should have skipped
                raise TrainingDiverged(f"step {step}: the loss is {stats.loss} but the update was applied "
                                       f"(gradient norm {stats.grad_norm}); is DeepSpeed's overflow check off?")
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.since_report += 1
        if self.announce:
            log.warning("step %d skipped: loss %s, gradient norm %s; weights and Adam moments unchanged "
                        "(%d in a row, train.max_skipped_steps=%d)", step, stats.loss, stats.grad_norm,
                        self.in_a_row, self.limit)

    def stop_if_diverged(self, step: int) -> None:
        """Raise TrainingDiverged once `limit` steps in a row, up to `step`, were skipped."""
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"training diverged: {self.in_a_row} steps in a row, up to step {step}, had a non-finite gradient "
                f"norm or loss (train.max_skipped_steps={self.limit}); lower optim.lr or resume from an earlier "
                "checkpoint")

    def pop(self) -> int:
        """Steps skipped since the last call."""
        count, self.since_report = self.since_report, 0
        return count


class _Throughput:
    """Tokens/s over the steps since the last report, excluding evaluation and checkpoint time."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.started, self.tokens, self.steps = time.perf_counter(), 0, 0
        self.phases: dict[str, float] = {}

    def add(self, tokens: int, phases: dict[str, float]) -> None:
        self.tokens += tokens
        self.steps += 1
        for name, seconds in phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + seconds

    def phase_means(self) -> dict[str, float]:
        """Seconds per step in each phase since the last restart."""
        return {f"time/{name}_s": total / max(1, self.steps) for name, total in self.phases.items()}

    def report(self) -> tuple[float, float]:
        """(tokens per second, seconds per step) since the last restart."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return self.tokens / elapsed, elapsed / max(1, self.steps)


def _data_health(train_batches: Iterable[Batch]) -> dict[str, int]:
    skipped = skipped_shards(train_batches)
    return {} if skipped is None else {"data/skipped_shards": skipped}


def progress_style(show: bool, is_main: bool, stream=None) -> str:
    """How rank 0 shows progress: "bar" (tqdm) on a terminal; "lines", one plain log line per log interval, when
    the output is not a terminal (a batch job's log file: SLURM, nohup, CI), so that no carriage returns fill it;
    "off" on other ranks or with train.progress_bar=false."""
    if not (show and is_main):
        return "off"
    stream = stream or sys.stderr  # where tqdm draws
    return "bar" if stream.isatty() else "lines"


def progress_line(step: int, max_steps: int, loss: float, tokens_per_s: float, step_s: float,
                  mfu: float | None) -> str:
    """One interval's progress for a log file: step, loss, tokens/s, MFU and the time left at this pace."""
    eta = int(round((max_steps - step) * step_s))
    hours, rest = divmod(eta, 3600)
    mfu_text = f" | MFU {mfu:.1%}" if mfu is not None else ""
    return (f"step {step}/{max_steps} ({step / max_steps:.0%}) | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s"
            f"{mfu_text} | ETA {hours}:{rest // 60:02d}:{rest % 60:02d}")


def _report_interval(progress: Progress, stats, meter: _Throughput, reconciler: Reconciler | None, bar,
                     sink: MetricsSink, flops_per_token: float, train_batches: Iterable[Batch],
                     skipped_steps: int, max_steps: int, lines: bool) -> None:
    """Log one interval's metrics (and the plan reconciliation) and refresh the progress bar, or log its line."""
    tokens_per_s, step_s = meter.report()
    reconciliation = {} if reconciler is None else reconciler.update(
        progress.tokens_seen, meter.tokens, meter.tokens / tokens_per_s, meter.phases)
    postfix = {"loss": f"{stats.loss:.3f}", "tok_s": f"{tokens_per_s:,.0f}"}
    if "cost/mfu" in reconciliation:
        postfix["mfu"] = f"{reconciliation['cost/mfu']:.1%}"
    bar.set_postfix(postfix, refresh=False)
    if lines:
        log.info("%s", progress_line(progress.step, max_steps, stats.loss, tokens_per_s, step_s,
                                     reconciliation.get("cost/mfu")))
    sink.log(progress.step, {
        "train/loss": stats.loss, "train/grad_norm": stats.grad_norm, "train/lr": stats.lr,
        "train/skipped_steps": skipped_steps,
        "perf/tokens_per_s": tokens_per_s, "perf/step_s": step_s,
        "perf/model_flops_per_s": tokens_per_s * flops_per_token,
        "progress/tokens_seen": progress.tokens_seen,
        **_data_health(train_batches),
        **meter.phase_means(),
        **reconciliation,
    })


def train_loop(
    engine: Engine,
    train_batches: Iterable[Batch],
    val_batches: list[Batch],
    config: Config,
    topo: Topology,
    progress: Progress,
    save_checkpoint: Callable[[Progress], None],
    sink: MetricsSink,
    flops_per_token: float,
    reconciler: Reconciler | None = None,
    preemption: PreemptionWatch | None = None,
) -> LoopResult:
    """Train from `progress.step` to `train.max_steps` (or `train.exit_after_steps` more), in place."""
    train = config.train
    last_step = train.max_steps
    if train.exit_after_steps is not None:
        last_step = min(last_step, progress.step + train.exit_after_steps)
    result = LoopResult()
    meter = _Throughput()
    skips = _SkipCounter(train.max_skipped_steps, topo.is_main)
    batches = iter(train_batches)
    style = progress_style(train.progress_bar, topo.is_main)
    bar = tqdm(
        total=train.max_steps, initial=progress.step, unit="step", dynamic_ncols=True, mininterval=1.0,
        disable=style != "bar",
    )
    with logging_redirect_tqdm():
        while progress.step < last_step:
            step_started = time.perf_counter()
            stats = engine.train_step(batches)
            result.train_seconds += time.perf_counter() - step_started
            progress.step += 1
            progress.tokens_seen += config.tokens_per_step
            result.tokens_trained += config.tokens_per_step
            meter.add(config.tokens_per_step, stats.phases)
            result.train_losses[progress.step] = stats.loss
            skips.record(progress.step, stats)
            bar.update(1)
            is_last = progress.step == last_step
            if progress.step % train.log_interval == 0 or is_last:
                _report_interval(progress, stats, meter, reconciler, bar, sink, flops_per_token, train_batches,
                                 skips.pop(), train.max_steps, lines=style == "lines")
                meter.restart()
            skips.stop_if_diverged(progress.step)  # after the report, so the record shows the skips
            evaluate_now = train.eval_interval and progress.step % train.eval_interval == 0
            if evaluate_now or progress.step == train.max_steps:
                result.val_losses[progress.step] = engine.evaluate(val_batches)
                sink.log(progress.step, {"val/loss": result.val_losses[progress.step]})
                log.info("step %d: train loss %.4f, val loss %.4f", progress.step, stats.loss,
                         result.val_losses[progress.step])
                meter.restart()
            if preemption is not None and not is_last and preemption.requested():
                result.preempted_by = preemption.received
                break  # the caller writes the checkpoint
            if train.checkpoint_interval and progress.step % train.checkpoint_interval == 0 and not is_last:
                save_checkpoint(progress)
                meter.restart()
    bar.close()
    return result
