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


def config_error_line(stderr: str) -> str:
    """What follows `config error: ` in the one line the README promises: stderr holds exactly one non-empty
    line, at ERROR level, and nothing else (no Hydra report, no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    match = re.fullmatch(r"\[\d\d:\d\d:\d\d ERROR\] config error: (.+)", lines[0])
    assert match, lines[0]
    return match.group(1)


def nothing_started(cwd) -> bool:
    """Only Hydra's record of the config (and its log file) was written: no data prepared, no checkpoint."""
    written = [p.relative_to(cwd) for p in cwd.rglob("*") if p.is_file()]
    return all(".hydra" in p.parts or p.suffix == ".log" for p in written)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_head=5", "model.n_head=5: must divide model.n_embd=128"),
        ("optim.lr=-0.001", "optim.lr=-0.001: must be positive"),
        ("train.seq_len=4096", "train.seq_len=4096: must be <= model.block_size=256"),
        ("parallel.pp=2 parallel.zero_stage=3",
         "parallel.zero_stage=3: DeepSpeed's pipeline engine supports ZeRO 0 or 1 only (parallel.pp=2)"),
        ("data.val_fraction=0.9", "data.val_fraction must be in (0, 0.5], got 0.9"),
    ],
)
def test_bad_values_fail_before_training_with_one_line(override, message, tmp_path):
    result = pretrain(override.split(), tmp_path, timeout=60)
    assert result.returncode == 2
    assert config_error_line(result.stderr) == message
    assert nothing_started(tmp_path)


PRESETS = "gpt2-small, gpt3-1.3b, gpt3-125m, gpt3-13b, gpt3-175b, gpt3-2.7b, gpt3-350m, gpt3-6.7b, gpt3-760m, tiny"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("model.n_headz=4", "model.n_headz: unknown key; did you mean model.n_head?"),
        ("model.n_head=abc", "model.n_head: Value 'abc' of type 'str' could not be converted to Integer"),
        ("model=gpt5", f"model=gpt5: no such preset (no model/gpt5.yaml); choose one of {PRESETS}"),
        # `+` adds a key the schema lacks without a word from Hydra; the trainer would ignore it.
        ("+train.max_step=5", "train.max_step: unknown key; did you mean train.max_steps?"),
        ("optim.lr=inf", "optim.lr=inf: must be finite"),
        ("-m optim.lr=1e-3,2e-3 model.n_headz=4", "model.n_headz: unknown key; did you mean model.n_head?"),
    ],
)
def test_unknown_keys_types_and_presets_are_named(overrides, message, tmp_path):
    result = pretrain(overrides.split(), tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    assert config_error_line(result.stderr) == message
    assert nothing_started(tmp_path)


def test_launch_local_refuses_a_key_the_schema_lacks(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "launch.local", "nproc=1", "+train.max_step=5"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    assert config_error_line(result.stderr) == "train.max_step: unknown key; did you mean train.max_steps?"
    assert not any(tmp_path.iterdir())


def test_trainer_cost_refuses_a_key_the_schema_lacks(capsys):
    from trainer.cost.__main__ import main

    assert main(["estimate", "+train.max_step=5"]) == 2
    assert capsys.readouterr().err == "trainer.cost: config error: train.max_step: unknown key; did you mean train.max_steps?\n"


def test_deepspeed_extra_takes_any_key():
    from trainer.config import ConfigError, compose_config

    extra = compose_config(["train.run_dir=.", "+deepspeed.extra.zero_allow_untested_optimizer=true",
                            "+deepspeed.extra.zero_optimization.round_robin_gradients=true"]).deepspeed.extra
    assert extra == {"zero_allow_untested_optimizer": True, "zero_optimization": {"round_robin_gradients": True}}
    with pytest.raises(ConfigError, match=r"^deepspeed\.extraa: unknown key; did you mean deepspeed\.extra\?$"):
        compose_config(["train.run_dir=.", "+deepspeed.extraa.x=1"])


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
