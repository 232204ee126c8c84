"""metrics.jsonl is strict JSON and, after a resume, holds each step once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from trainer.checkpoint import list_checkpoints
from trainer.config import LoggingConfig
from trainer.metrics import MetricsSink
from trainer.run import run

NO_WANDB = LoggingConfig(wandb=False)


def strict_records(path: Path) -> list[dict]:
    """Every line parsed by a JSON parser that refuses NaN and Infinity, as other languages' parsers do."""
    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_non_finite_values_are_written_as_null(tmp_path):
    sink = MetricsSink(tmp_path, NO_WANDB, "run", {}, enabled=True, resumed_at=0)
    sink.log(1, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "train/lr": 1e-3})
    sink.summary({"val_loss": float("-inf"), "memory_per_rank": [{"peak": float("nan")}], "final_step": 1})
    sink.close()
    step, summary = strict_records(tmp_path / "metrics.jsonl")
    assert step == {"step": 1, "train/loss": None, "train/grad_norm": None, "train/lr": 1e-3}
    assert summary == {"summary": {"val_loss": None, "memory_per_rank": [{"peak": None}], "final_step": 1}}


def test_a_resumed_sink_drops_the_records_past_its_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    earlier = [{"step": s, "train/loss": 10.0 - s} for s in range(1, 7)] + [{"summary": {"final_step": 6}}]
    # An older writer's bare NaN, and a last line cut short by a crash.
    metrics.write_text("".join(json.dumps(r) + "\n" for r in earlier) + '{"step": 4, "val/loss": NaN}\n{"step": 7, "tr')
    sink = MetricsSink(tmp_path, NO_WANDB, "run", {}, enabled=True, resumed_at=4)
    for step in (5, 6):
        sink.log(step, {"train/loss": 1.0})
    sink.close()
    records = strict_records(metrics)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4, 5, 6]
    assert records[4] == {"step": 4, "val/loss": None}
    assert [r["train/loss"] for r in records if r["step"] > 4] == [1.0, 1.0]


def test_a_fresh_start_drops_an_abandoned_attempts_records(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "train/loss": 5.0}\n')
    MetricsSink(tmp_path, NO_WANDB, "run", {}, enabled=True, resumed_at=0).close()
    assert metrics.read_text() == ""


def test_other_ranks_leave_the_file_alone(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 9}\n')
    MetricsSink(tmp_path, NO_WANDB, "run", {}, enabled=False, resumed_at=0).close()
    assert metrics.read_text() == '{"step": 9}\n'


def test_a_run_resumed_from_an_earlier_checkpoint_logs_each_step_once(small_run, one_thread):
    config = small_run("train.max_steps=6", "train.checkpoint_interval=3", "train.eval_interval=3")
    run(config)
    root = Path(config.train.run_dir) / "checkpoints"
    shutil.rmtree(dict(list_checkpoints(root))[6])  # as if the run had died before its final save
    resumed = run(config)
    records = strict_records(Path(config.train.run_dir) / "metrics.jsonl")
    train = [r["step"] for r in records if "train/loss" in r]
    val = [r["step"] for r in records if "val/loss" in r]
    assert train == [1, 2, 3, 4, 5, 6] and val == [3, 6]
    assert [r for r in records if "summary" in r] == [records[-1]]
    assert {r["step"]: r["train/loss"] for r in records if r.get("step", 0) > 3 and "train/loss" in r} == {
        s: resumed.train_losses[s] for s in (4, 5, 6)}
