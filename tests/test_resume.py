"""Resuming continues the same loss curve: N steps straight == N/2, stop, resume, N/2 more."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from tests.test_checkpoint import _overwrite_tensor
from trainer.checkpoint import CheckpointError, CheckpointReader, list_checkpoints
from trainer.run import run


def test_resume_continues_the_same_loss_curve(small_run, tmp_path):
    steps = ["train.max_steps=8", "train.grad_accum_steps=2", "train.eval_interval=4", "train.checkpoint_interval=0"]
    straight = run(small_run(*steps, f"train.run_dir={tmp_path / 'straight'}"))

    first_half = run(small_run(*steps, "train.exit_after_steps=4", f"train.run_dir={tmp_path / 'split'}"))
    assert first_half.final_step == 4
    second_half = run(small_run(*steps, f"train.run_dir={tmp_path / 'split'}"))

    assert sorted(second_half.train_losses) == [5, 6, 7, 8]
    # Same data position, optimizer moments, LR schedule and RNG: bitwise the same losses.
    assert [second_half.train_losses[s] for s in range(5, 9)] == [straight.train_losses[s] for s in range(5, 9)]
    assert [first_half.train_losses[s] for s in range(1, 5)] == [straight.train_losses[s] for s in range(1, 5)]
    assert second_half.val_losses[8] == straight.val_losses[8]
    assert second_half.tokens_seen == straight.tokens_seen


def test_resume_with_dropout_restores_the_random_generators(small_run, tmp_path, monkeypatch):
    steps = ["train.max_steps=6", "model.dropout=0.1", "train.eval_interval=0", "train.checkpoint_interval=0"]
    straight = run(small_run(*steps, f"train.run_dir={tmp_path / 'straight'}"))
    run(small_run(*steps, "train.exit_after_steps=3", f"train.run_dir={tmp_path / 'split'}"))
    shutil.copytree(tmp_path / "split", tmp_path / "fresh-rng")
    second_half = run(small_run(*steps, f"train.run_dir={tmp_path / 'split'}"))
    # The dropout masks of steps 4-6 come from the generators saved at step 3: the same bits.
    assert [second_half.train_losses[s] for s in (4, 5, 6)] == [straight.train_losses[s] for s in (4, 5, 6)]

    # Control: the same resume with generators that start fresh draws other masks, so the check above
    # depends on the restore.
    monkeypatch.setattr(CheckpointReader, "restore_rng", lambda reader, topo: False)
    fresh = run(small_run(*steps, f"train.run_dir={tmp_path / 'fresh-rng'}"))
    assert all(fresh.train_losses[s] != straight.train_losses[s] for s in (4, 5, 6))


@pytest.mark.parametrize("split", ["global", "shards"])
def test_resume_with_dataloader_workers_continues_the_same_loss_curve(small_run, tmp_path, split):
    steps = ["train.max_steps=6", "train.eval_interval=0", "train.checkpoint_interval=0", "data.num_workers=2",
             f"data.split={split}"]
    straight = run(small_run(*steps, f"train.run_dir={tmp_path / 'straight'}"))
    run(small_run(*steps, "train.exit_after_steps=3", f"train.run_dir={tmp_path / 'split'}"))
    second_half = run(small_run(*steps, f"train.run_dir={tmp_path / 'split'}"))
    assert [second_half.train_losses[s] for s in (4, 5, 6)] == [straight.train_losses[s] for s in (4, 5, 6)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_mixture_of_corpora_trains_and_resumes(small_run, small_corpus, tmp_path, num_workers):
    code = tmp_path / "second-corpus"
    shutil.copytree(small_corpus, code)  # same tokenizer, a second location: a two-corpus mixture
    mixture = f"data.mixture='{small_corpus}:0.7,{code}:0.3'"  # quoted: a comma means a sweep to Hydra
    steps = ["train.max_steps=6", "train.eval_interval=0", "train.checkpoint_interval=0", mixture,
             f"data.num_workers={num_workers}"]  # with workers: each component has its own
    straight = run(small_run(*steps, f"train.run_dir={tmp_path / 'straight'}"))
    run(small_run(*steps, "train.exit_after_steps=3", f"train.run_dir={tmp_path / 'split'}"))
    second_half = run(small_run(*steps, f"train.run_dir={tmp_path / 'split'}"))
    assert [second_half.train_losses[s] for s in (4, 5, 6)] == [straight.train_losses[s] for s in (4, 5, 6)]


def test_periodic_checkpoints_keep_the_last_k(small_run, tmp_path):
    summary = run(small_run("train.max_steps=6", "train.checkpoint_interval=2", "train.keep_last_checkpoints=2"))
    root = tmp_path / "run" / "checkpoints"
    assert [step for step, _ in list_checkpoints(root)] == [4, 6]
    assert summary.checkpoint == str(root / "step_00000006")
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    state = json.loads((root / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["layout"] == {"tp": 1, "pp": 1, "dp": 1}


def test_resume_refuses_a_checkpoint_of_another_model(small_run):
    run(small_run("train.max_steps=2"))
    with pytest.raises(CheckpointError, match=r"model\.n_embd=32 \(this run: 64\)"):
        run(small_run("train.max_steps=4", "model.n_embd=64"))


def test_resume_never_refuses_to_mix_with_existing_checkpoints(small_run):
    run(small_run("train.max_steps=2"))
    with pytest.raises(CheckpointError, match="train.resume=never"):
        run(small_run("train.max_steps=4", "train.resume=never"))


def test_finished_run_rerun_reports_without_training(small_run):
    first = run(small_run("train.max_steps=3"))
    again = run(small_run("train.max_steps=3"))
    assert again.final_step == 3 and again.tokens_trained == 0
    assert again.val_loss == first.val_loss


def test_resume_auto_falls_back_past_a_truncated_checkpoint_on_the_same_curve(small_run, tmp_path, caplog):
    steps = ["train.max_steps=6", "train.eval_interval=0", "train.checkpoint_interval=2"]
    straight = run(small_run(*steps, f"train.run_dir={tmp_path / 'straight'}"))
    run(small_run(*steps, "train.exit_after_steps=4"))
    root = tmp_path / "run" / "checkpoints"
    optim = root / "step_00000004" / "optim-tp00-pp00.safetensors"
    optim.write_bytes(optim.read_bytes()[:1000])  # one truncated file; step 2 is intact
    with caplog.at_level(logging.INFO):
        resumed = run(small_run(*steps))
    assert f"passing over a damaged checkpoint: {optim}: 1000 bytes" in caplog.text
    assert f"resumed from {root / 'step_00000002'} (step 2" in caplog.text
    assert [resumed.train_losses[s] for s in (3, 4, 5, 6)] == [straight.train_losses[s] for s in (3, 4, 5, 6)]


def test_nan_bytes_in_a_weight_file_are_a_checksum_error_not_a_learning_rate_problem(small_run, tmp_path):
    run(small_run("train.max_steps=2", "train.eval_interval=0", "train.checkpoint_interval=1"))
    root = tmp_path / "run" / "checkpoints"
    newest = root / "step_00000002"
    name = CheckpointReader(newest).parameter_names()[0]
    weights = newest / "model-tp00-pp00.safetensors"
    _overwrite_tensor(weights, name, torch.full_like(CheckpointReader(newest).read(name), float("nan")))
    with pytest.raises(CheckpointError) as refused:
        run(small_run("train.max_steps=4", f"train.resume={newest}"))
    assert f"{weights}: checksum mismatch in tensor {name!r}" in str(refused.value)
    assert str(refused.value).endswith(f"use train.resume={root / 'step_00000001'}")
