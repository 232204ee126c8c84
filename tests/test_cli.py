"""The command line: config errors in one line, --cfg job, multirun sweeps, and an end-to-end run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import SMALL_RUN, small_corpus_args


def pretrain(args: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "trainer.pretrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_head=5", "model.n_head=5: must divide model.n_embd=128"),
        ("optim.lr=-0.001", "optim.lr=-0.001: must be positive"),
        ("train.seq_len=4096", "train.seq_len=4096: must be <= model.block_size=256"),
        ("parallel.zero_stage=3", None),  # valid on its own; checked below with pp
        ("data.val_fraction=0.9", "data.val_fraction must be in (0, 0.5]"),
    ],
)
def test_bad_values_fail_before_training_with_one_line(override, message, tmp_path):
    if message is None:
        override, message = "parallel.pp=2 parallel.zero_stage=3", "ZeRO 0 or 1 only"
    result = pretrain(override.split(), tmp_path, timeout=60)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if "config error" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [("model.nlayers=3", "Key 'nlayers' not in 'ModelConfig'"),
     ("optim.lr=fast", "Value 'fast' of type 'str' could not be converted to Float"),
     ("model=gpt5", "Could not find 'model/gpt5'")],
)
def test_unknown_keys_types_and_presets_are_named(override, message, tmp_path):
    result = pretrain([override], tmp_path, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_data_source_is_named(tmp_path):
    result = pretrain(["data.source=/no/such/corpus", f"data.prepared_dir={tmp_path / 'p'}", *SMALL_RUN], tmp_path)
    assert result.returncode == 2
    assert "error: data.source '/no/such/corpus' does not exist" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_cfg_job_prints_the_resolved_config(tmp_path):
    result = pretrain(["--cfg", "job", "model=gpt3-1.3b", "optim.lr=3e-4"], tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "n_layer: 24" in result.stdout and "n_embd: 2048" in result.stdout and "lr: 0.0003" in result.stdout


@pytest.mark.slow
def test_end_to_end_run_learns_and_reports(small_corpus, tmp_path):
    args = [*SMALL_RUN, *small_corpus_args(small_corpus), "model.n_embd=64", "model.block_size=64", "train.max_steps=150",
            "train.micro_batch_size=16", "train.log_interval=25", "train.eval_interval=50",
            "train.checkpoint_interval=100", "optim.lr=3e-3", "optim.warmup_steps=10", "logging.wandb=true",
            "train.run_name=e2e"]
    result = pretrain(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr + result.stdout
    final = re.search(r"train loss ([\d.]+) \| val loss ([\d.]+) \| unigram entropy of the corpus ([\d.]+)", log)
    assert final, log[-3000:]
    train_loss, val_loss, entropy = map(float, final.groups())
    assert val_loss < entropy - 0.5, (val_loss, entropy)
    assert re.search(r"checkpoint: .*runs/e2e/checkpoints/step_00000150", log)
    assert re.search(r"cost: 153,600 tokens this run .* model FLOPs .* FLOP/s achieved", log)
    run_dir = tmp_path / "runs" / "e2e"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [25, 50, 75, 100, 125, 150]
    assert any("val/loss" in r for r in records) and "summary" in records[-1]
    assert list((run_dir / "wandb").glob("offline-run-*"))  # W&B wrote its offline run locally
    # The run was reconciled with its plan: MFU and projections logged, a table and a cost plot at the end.
    assert all("cost/mfu" in r and "cost/gap" in r for r in records if "train/loss" in r)
    assert "plan vs measured" in log and (run_dir / "cost.png").is_file()
    assert re.search(r"memory per rank: estimated .* MiB parameters", log)


@pytest.mark.slow
def test_multirun_sweep_runs_each_job(small_corpus, tmp_path):
    args = ["-m", "optim.lr=1e-3,2e-3", *SMALL_RUN, *small_corpus_args(small_corpus), "train.max_steps=3",
            "train.run_name=sweep"]
    result = pretrain(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "multirun" / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["job0", "job1"]
    for job, lr in (("job0", "optim.lr=0.001"), ("job1", "optim.lr=0.002")):
        assert lr in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert (sweep / job / "checkpoints" / "step_00000003").is_dir()
        assert json.loads((sweep / job / "metrics.jsonl").read_text().splitlines()[-1])["summary"]["final_step"] == 3
