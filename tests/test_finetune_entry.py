"""Fine-tuning runs: train.epochs as the run's length, the train/finetune preset, `python -m trainer.finetune`,
and a shortened `make finetune` demo whose held-out response loss must fall below the base model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data_pipeline.sft_stream import SFTStream
from data_pipeline.shards import read_index
from tests.conftest import SMALL_RUN, logged, small_corpus_args
from tests.test_cli import config_error_line
from tests.test_finetune import sft_args
from trainer import finetune_demo
from trainer.config import CONF_DIR, ConfigError, compose_config, register_configs, to_config
from trainer.finetune import check_finetune
from trainer.optim import lr_at
from trainer.run import run, with_epochs

EPOCHS, MICRO_BATCH = 2, 16
NO_RUN = "train.run_dir=unused"  # composed and validated only: never run


def test_epochs_set_the_run_length(sft_data, tmp_path, one_thread):
    """train.epochs=2 trains ceil(rows of epochs 0 and 1 / rows per step) steps, whatever train.max_steps says,
    and the schedule, the checkpoint and the data position all see that length."""
    config = compose_config([*sft_args(sft_data), f"train.epochs={EPOCHS}", f"train.micro_batch_size={MICRO_BATCH}",
                             f"train.run_dir={tmp_path}"])
    rows = SFTStream(str(sft_data), "train", config.seq_len, MICRO_BATCH, seed=config.data.seed).rows_in_epochs(EPOCHS)
    steps = -(-rows // MICRO_BATCH)
    assert steps != config.train.max_steps and (steps - 1) * MICRO_BATCH < rows <= steps * MICRO_BATCH
    summary = run(config)
    assert summary.final_step == steps == max(summary.train_losses)
    assert logged(tmp_path / "metrics.jsonl", "train/lr")[steps] == pytest.approx(lr_at(steps - 1, config.optim, steps))
    checkpoint = Path(summary.checkpoint)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["config"]["train"]["max_steps"] == steps
    data = json.loads((checkpoint / "data.json").read_text())
    assert (data["epoch"], data["row"]) == (EPOCHS, steps * MICRO_BATCH - rows)  # the last step spills over


def test_epochs_refused_on_pretraining_data_and_warmup_rechecked(small_corpus, sft_data):
    pretraining = compose_config([*SMALL_RUN, *small_corpus_args(small_corpus), "train.epochs=1", NO_RUN])
    with pytest.raises(ConfigError, match=r"^train\.epochs=1: .*pretraining data"):
        with_epochs(pretraining, read_index(small_corpus))
    with pytest.raises(ConfigError, match=r"^train\.epochs=1: .*no fine-tuning data"):
        check_finetune(compose_config([*SMALL_RUN, *small_corpus_args(small_corpus), "train.epochs=1",
                                       "train.init_from=somewhere", NO_RUN]))
    # train.max_steps (600) means nothing with epochs: the warmup is checked against the steps the epochs take.
    long_warmup = compose_config([*sft_args(sft_data), "train.epochs=1", "train.max_steps=600",
                                  "optim.warmup_steps=700", NO_RUN])
    with pytest.raises(ConfigError, match=r"^optim\.warmup_steps=700: must be <= the \d+ steps of train\.epochs=1"):
        with_epochs(long_warmup, read_index(sft_data))


# ---------------------------------------------------------------------------------------------------------
# The preset and the entry point


def compose_finetune(overrides: list[str]):
    """conf/finetune.yaml (trainer.finetune's primary config) composed and validated."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(compose(config_name="finetune", overrides=overrides))


def test_the_finetune_preset_composes_and_the_command_line_wins():
    pretrain = compose_config([NO_RUN])
    preset = compose_config(["train=finetune", NO_RUN])
    assert preset.train.epochs == 3 and pretrain.train.epochs is None
    assert preset.optim.lr < pretrain.optim.lr and preset.optim.warmup_steps < pretrain.optim.warmup_steps
    assert preset.optim.beta2 == pretrain.optim.beta2  # the rest of optim/adamw stays
    mixed = compose_config(["model=gpt2-small", "hardware=h100-sxm", "train=finetune", "optim.lr=1e-5",
                            "train.epochs=1", "parallel.tp=2", "optim.warmup_steps=3", NO_RUN])
    assert (mixed.optim.lr, mixed.train.epochs, mixed.optim.warmup_steps) == (1e-5, 1, 3)
    assert (mixed.model.name, mixed.hardware.name, mixed.optim.decay) == ("gpt2-small", "h100-sxm", "linear")
    entry = compose_finetune(["optim.lr=2e-5", NO_RUN])
    assert (entry.train.epochs, entry.optim.lr, entry.train.run_name) == (3, 2e-5, "tiny-finetune")
    assert compose_finetune(["train=pretrain", NO_RUN]).train.epochs is None  # the preset can be swapped out


def test_finetune_entry_requires_init_from(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "trainer.finetune", "logging.wandb=false"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert config_error_line(result.stderr).startswith("train.init_from: fine-tuning starts from a model")


# ---------------------------------------------------------------------------------------------------------
# The demo, shortened: a base pretrained for a few steps, the task from a few stdlib modules


def fine_tune_in_process(base: Path, prepared: Path, run_dir: Path, overrides: list[str]) -> Path:
    """What the demo runs as `python -m trainer.finetune`, in this process (no second start-up)."""
    config = compose_finetune([*finetune_demo.finetune_overrides(base, prepared, run_dir, overrides),
                               f"train.run_dir={run_dir}"])
    return Path(run(config).checkpoint)


def test_a_short_demo_lowers_the_held_out_response_loss(small_corpus, tmp_path, one_thread):
    shape = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=96"]
    quiet = ["train.progress_bar=false", "logging.wandb=false", "train.eval_batches=1"]
    base = run(compose_config([*shape, *quiet, *small_corpus_args(small_corpus), "train.max_steps=6",
                               "train.micro_batch_size=4", "optim.warmup_steps=1", f"train.run_dir={tmp_path / 'base'}"]))
    args = finetune_demo.parse_args([
        "--base", base.checkpoint, "--jsonl", str(tmp_path / "task.jsonl"), "--prepared", str(tmp_path / "task"),
        "--run-dir", str(tmp_path / "tuned"), "--max-modules", "30", "--val-fraction", "0.2",
        "--max-new-tokens", "4", *shape, "model.vocab_size=512", *quiet, "train.epochs=2",
        "train.micro_batch_size=8", "optim.warmup_steps=2", "optim.lr=3e-3", "train.eval_interval=0",
    ])
    before, after = finetune_demo.demo(args, fine_tune_in_process)
    assert after.loss < before.loss - 0.5, (before.loss, after.loss)
    assert json.loads((tmp_path / "tuned" / "demo.json").read_text())["after"]["loss"] == after.loss
