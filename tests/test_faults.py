"""Fault injection: SIGKILLs at random steps and in the middle of a save resume on the same bits; bad input, a
full disk and a model too large for the machine end in one line and exit status 2."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.prepare import load_index
from tests.conftest import SMALL_RUN, small_corpus_args
from tests.test_checkpoint import _mount_tmpfs
from tests.test_cli import config_error_line
from trainer.checkpoint import CheckpointReader, checkpoint_problem, list_checkpoints
from trainer.config import compose_config
from trainer.pretrain import run_or_exit
from trainer.run import run

MAX_STEPS = 24
FAULT_RUN = ["train.eval_interval=0", "train.keep_last_checkpoints=2", f"train.max_steps={MAX_STEPS}"]

# A training run in a subprocess, as `run()` does it; with KILL_IN_SAVE=k it SIGKILLs itself in the middle of
# its k-th checkpoint save: the weights written, the moments not yet.
RUNNER = """
import os, signal, sys
from trainer.config import compose_config
from trainer.run import run

kill_in_save = int(os.environ.get("KILL_IN_SAVE", "0"))
if kill_in_save:
    from trainer import checkpoint

    original, calls = checkpoint.save_file, []

    def save_file(tensors, path):
        original(tensors, path)
        calls.append(path)
        if len(calls) == 2 * kill_in_save - 1:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = save_file
run(compose_config(sys.argv[1:]))
"""


def _overrides(corpus: Path, run_dir: Path, checkpoint_interval: int = 1) -> list[str]:
    return [*SMALL_RUN, *small_corpus_args(corpus), *FAULT_RUN, f"train.checkpoint_interval={checkpoint_interval}",
            f"train.run_dir={run_dir}"]


@pytest.fixture(scope="module")
def straight(small_corpus, tmp_path_factory):
    """The uninterrupted run the interrupted ones must equal (checkpoints change nothing: none in between)."""
    return run(compose_config(_overrides(small_corpus, tmp_path_factory.mktemp("straight"), checkpoint_interval=0)))


def _start(corpus: Path, run_dir: Path, **env: str) -> subprocess.Popen:
    # The same intra-op threads as this process: the same reduction order, so the same bits.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": str(torch.get_num_threads()), **env}
    return subprocess.Popen([sys.executable, "-c", RUNNER, *_overrides(corpus, run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _last_step_logged(metrics: Path) -> int:
    """The last step in a metrics.jsonl being written (a line still being written is not read)."""
    if not metrics.is_file():
        return 0
    steps = [0]
    for line in metrics.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            break
    return max(steps)


def _assert_resumed_on_the_same_bits(resumed, straight, resumed_from: int) -> None:
    assert sorted(resumed.train_losses) == list(range(resumed_from + 1, MAX_STEPS + 1))
    assert {s: resumed.train_losses[s] for s in resumed.train_losses} == {
        s: straight.train_losses[s] for s in resumed.train_losses}
    mine, theirs = CheckpointReader(Path(resumed.checkpoint)), CheckpointReader(Path(straight.checkpoint))
    for name in theirs.parameter_names():
        for key in (name, f"exp_avg/{name}", f"exp_avg_sq/{name}"):
            assert torch.equal(mine.read(key), theirs.read(key)), key


@pytest.mark.parametrize("seed", [0, 1])
def test_a_sigkill_at_a_random_step_resumes_on_the_same_bits(seed, straight, small_corpus, tmp_path):
    rng = random.Random(seed)
    kill_after, delay = rng.randint(1, MAX_STEPS // 2), rng.uniform(0.0, 0.03)  # in a step or in a save
    process = _start(small_corpus, tmp_path / "run")
    deadline = time.monotonic() + 120
    while process.poll() is None and _last_step_logged(tmp_path / "run" / "metrics.jsonl") < kill_after:
        assert time.monotonic() < deadline, "the run did not reach its step in time"
        time.sleep(0.005)
    time.sleep(delay)
    process.kill()
    output, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL, output[-3000:]
    saved = [step for step, _ in list_checkpoints(tmp_path / "run" / "checkpoints")]
    resumed = run(compose_config(_overrides(small_corpus, tmp_path / "run", checkpoint_interval=0)))
    _assert_resumed_on_the_same_bits(resumed, straight, saved[-1] if saved else 0)


def test_a_sigkill_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(straight, small_corpus, tmp_path):
    process = _start(small_corpus, tmp_path / "run", KILL_IN_SAVE="3")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, output[-3000:]
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002", "step_00000003.tmp"]
    resumed = run(compose_config(_overrides(small_corpus, tmp_path / "run")))
    _assert_resumed_on_the_same_bits(resumed, straight, resumed_from=2)
    assert not list(root.glob("*.tmp"))  # the step-3 save of the resumed run replaced the remains


# --- one line and exit status 2 ---------------------------------------------------------------------------
def _one_line_exit(config, caplog) -> str:
    """Run as `python -m trainer.pretrain` does: exit status 2 and exactly one ERROR line, which is returned."""
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stop:
        run_or_exit(config)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert stop.value.code == 2 and len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_a_full_disk_during_a_save_ends_in_one_line_and_keeps_the_previous_checkpoint(small_run, tmp_path, caplog):
    checkpoints = tmp_path / "run" / "checkpoints"
    _mount_tmpfs(checkpoints, "800k")  # room for one checkpoint of the small model (~0.55 MB), not two
    try:
        line = _one_line_exit(small_run("train.max_steps=4", "train.checkpoint_interval=2", "train.eval_interval=0"),
                              caplog)
        assert re.fullmatch(r"error: checkpoint step_00000004 not saved: \S+step_00000004.tmp/\S+: cannot be written "
                            r"\(.*No space left on device.*\); its .tmp directory was removed, the checkpoints "
                            r"saved before are as they were", line), line
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]
        assert checkpoint_problem(checkpoints / "step_00000002") is None
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)


def test_a_corrupt_validation_shard_ends_in_one_line_naming_it(small_corpus, tmp_path, caplog):
    prepared = tmp_path / "prepared"
    shutil.copytree(small_corpus, prepared)  # the session's corpus stays intact for other tests
    shard = prepared / load_index(prepared)["splits"]["val"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    config = compose_config([*SMALL_RUN, *small_corpus_args(prepared), "data.prepare=never",
                             f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2"])
    assert f"corrupt shard {shard}" in _one_line_exit(config, caplog)


def test_an_index_naming_a_command_ends_in_one_line_and_runs_nothing(small_corpus, tmp_path, caplog):
    prepared = tmp_path / "prepared"
    shutil.copytree(small_corpus, prepared)
    index_file = prepared / "index.json"
    index = json.loads(index_file.read_text())
    pwned = tmp_path / "pwned"
    index["splits"]["train"]["shards"][0]["file"] = f"pipe:touch {pwned}; cat x"
    index_file.write_text(json.dumps(index))
    config = compose_config([*SMALL_RUN, *small_corpus_args(prepared), "data.prepare=never",
                             f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2"])
    line = _one_line_exit(config, caplog)
    assert str(index_file) in line and "not a plain file name" in line, line
    assert not pwned.exists()


def test_a_model_too_large_for_the_machine_is_refused_before_it_is_allocated(small_run, monkeypatch, caplog):
    monkeypatch.setattr("trainer.run.build_model", lambda *args: pytest.fail("the model was built"))
    line = _one_line_exit(small_run("model.n_embd=65536"), caplog)
    assert re.fullmatch(r"error: model.n_layer=2 model.n_embd=65536: needs at least [\d,.]+ GiB per rank by the "
                        r"cost model's estimate .* more than the [\d,.]+ GiB of available RAM; .*", line), line


def test_a_trainer_state_with_wrong_types_ends_in_one_line_naming_the_file(small_run, tmp_path, caplog):
    run(small_run("train.max_steps=2", "train.eval_interval=0"))
    state_file = tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "tokens_seen": "256"}))
    line = _one_line_exit(small_run("train.max_steps=4"), caplog)
    assert f"{state_file}: not a trainer state: 'tokens_seen' is '256', not an int" in line


@pytest.mark.parametrize(("files", "problem"), [
    ({"empty.txt": b"", "records.jsonl": b'{"body": "text under another field"}\n'},
     "yielded no documents (empty ones are dropped; bad input skipped: 1 missing_text (first: {root}/records.jsonl "
     "line 1))"),
    ({"weights.txt": bytes(range(128, 256)) * 16},
     "yielded no documents (empty ones are dropped; bad input skipped: 1 invalid_utf8 (first: {root}/weights.txt "
     "line 1))"),
])
def test_a_source_without_documents_ends_in_one_line_naming_what_was_skipped(tmp_path, caplog, files, problem):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    config = compose_config([*SMALL_RUN, f"data.source={root}", f"data.prepared_dir={tmp_path / 'prepared'}",
                             "model.vocab_size=512", f"train.run_dir={tmp_path / 'run'}"])
    assert _one_line_exit(config, caplog) == f"error: data.source '{root}' " + problem.format(root=root)


# Runs the training command in a subprocess and says at exit whether torch was ever imported.
PRETRAIN_IMPORTS = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules))
from trainer.pretrain import main
sys.argv[0] = "trainer.pretrain"
main()
"""


@pytest.mark.parametrize(("source", "problem"), [
    ("{tmp}/no/such/corpus", "data.source '{tmp}/no/such/corpus' does not exist"),
    (" , ", "data.source ' , ' names no source"),
    ("{tmp}/model.bin", "data.source '{tmp}/model.bin': {tmp}/model.bin is not a document file (one of .txt, .py, "
                        ".jsonl, .jsonl.gz, .jsonl.zst, .parquet)"),
])
def test_a_bad_data_source_is_refused_before_the_heavy_imports(tmp_path, source, problem):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)))
    command = [sys.executable, "-c", PRETRAIN_IMPORTS, f"data.source='{source.format(tmp=tmp_path)}'",
               f"data.prepared_dir={tmp_path / 'prepared'}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert config_error_line(result.stderr) == problem.format(tmp=tmp_path)
    assert "torch imported: False" in result.stdout
