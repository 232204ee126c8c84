"""Non-finite values never reach a checkpoint: NaN steps are skipped, divergence stops the run in one line.

Each layout is checked on its checkpoints: with one saved at every step, the weights and Adam moments after a
skipped step equal those before it bit for bit. The DeepSpeed internals the skip relies on (listed in
trainer/engine.py) have one test each, on a two-parameter model.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from launch.rendezvous import free_port
from tests.conftest import SMALL_RUN, logged, small_corpus_args
from tests.workers.instruments import nan_gradient_at
from trainer.checkpoint import (
    CheckpointError,
    CheckpointReader,
    ShardState,
    TrainerState,
    list_checkpoints,
    save_checkpoint,
)
from trainer.config import ConfigError
from trainer.engine import optimizer_checks_overflow
from trainer.loop import TrainingDiverged
from trainer.optim import lr_at
from trainer.parallel.topology import Topology
from trainer.run import run

REPO = Path(__file__).resolve().parent.parent
# A checkpoint after every step, none pruned, so the state around a skipped step can be compared.
EVERY_STEP = ["train.checkpoint_interval=1", "train.keep_last_checkpoints=0", "train.eval_interval=0"]
# Issue 11's repro on the small model: from step 2 on the gradient norm is NaN (the loss is still finite).
DIVERGING = ["optim.lr=1e6", "optim.warmup_steps=10", "train.max_steps=60"]


def checkpoints(run_dir: Path) -> dict[int, CheckpointReader]:
    return {step: CheckpointReader(path) for step, path in list_checkpoints(run_dir / "checkpoints")}


def saved_tensors(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """Every weight and Adam moment of a checkpoint, by key."""
    names = reader.parameter_names()
    return {key: reader.read(key) for name in names for key in (name, f"exp_avg/{name}", f"exp_avg_sq/{name}")}


def assert_bitwise_equal(before: CheckpointReader, after: CheckpointReader) -> None:
    expected, got = saved_tensors(before), saved_tensors(after)
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), f"{key} changed across a skipped step"
    assert after.adam_step == before.adam_step


def assert_all_finite(reader: CheckpointReader) -> None:
    for key, tensor in saved_tensors(reader).items():
        assert torch.isfinite(tensor).all(), f"{reader.path}: {key} is not finite"


# bf16 autocast takes the same path as fp32 (the optimizer is our AdamW either way, see the DeepSpeed tests
# below); on the CPU megatron-core's linear layers refuse it (a bf16 input against an fp32 weight).
LAYOUTS = {
    "zero0-fp32": [],
    "zero1": ["parallel.zero_stage=1"],
    "zero2-accum2": ["parallel.zero_stage=2", "train.grad_accum_steps=2"],
    "zero3": ["parallel.zero_stage=3"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_nan_gradient_skips_its_step_and_training_goes_on(layout, small_run, tmp_path, one_thread):
    config = small_run("train.max_steps=5", *EVERY_STEP, *LAYOUTS[layout])
    with nan_gradient_at({3}):
        summary = run(config)
    run_dir = Path(config.train.run_dir)
    saved = checkpoints(run_dir)
    assert sorted(saved) == [1, 2, 3, 4, 5]
    assert_bitwise_equal(saved[2], saved[3])
    assert saved[4].adam_step == 3 and saved[5].adam_step == 4
    names = saved[3].parameter_names()
    assert all(not torch.equal(saved[3].read(n), saved[4].read(n)) for n in names)  # the curve goes on
    metrics = run_dir / "metrics.jsonl"
    assert logged(metrics, "train/skipped_steps") == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0}
    assert logged(metrics, "train/grad_norm")[3] is None  # NaN or inf, written as null
    assert all(math.isfinite(summary.train_losses[step]) for step in (4, 5))
    # The LR schedule is a function of the step, skipped or not (so a resumed run meets the same rates).
    assert logged(metrics, "train/lr")[4] == pytest.approx(lr_at(3, config.optim, config.train.max_steps))


def test_max_skipped_steps_in_a_row_stop_the_run(small_run, tmp_path, one_thread):
    config = small_run("train.max_steps=8", "train.max_skipped_steps=3", *EVERY_STEP)
    with nan_gradient_at({2, 4, 5, 6}), pytest.raises(TrainingDiverged, match="3 steps in a row, up to step 6"):
        run(config)
    metrics = Path(config.train.run_dir) / "metrics.jsonl"
    assert logged(metrics, "train/skipped_steps") == {1: 0, 2: 1, 3: 0, 4: 1, 5: 1, 6: 1}
    saved = checkpoints(Path(config.train.run_dir))
    assert sorted(saved) == [1, 2, 3, 4, 5]  # step 6's is not written: the run stops first
    assert_bitwise_equal(saved[3], saved[5])


def test_max_skipped_steps_must_be_positive(small_run):
    with pytest.raises(ConfigError, match="train.max_skipped_steps=0: must be positive"):
        small_run("train.max_skipped_steps=0")


def test_a_huge_learning_rate_never_leaves_a_non_finite_checkpoint(small_run, one_thread):
    """The repro of issue 11: `optim.lr=1e6 train.checkpoint_interval=1`, run twice. Step 2's loss is finite
    but its gradient norm is NaN; before, its update went through, step 2's checkpoint held NaN weights and
    moments, and the second run resumed them."""
    config = small_run(*DIVERGING, "train.max_skipped_steps=2", *EVERY_STEP)
    for attempt, stop in enumerate((3, 4)):  # the rerun resumes at step 2's checkpoint and skips again
        with pytest.raises(TrainingDiverged, match=f"2 steps in a row, up to step {stop}"):
            run(config)
        saved = checkpoints(Path(config.train.run_dir))
        assert sorted(saved) == list(range(1, stop)), f"attempt {attempt}"
        for reader in saved.values():
            assert_all_finite(reader)
    assert_bitwise_equal(saved[1], saved[3])
    skipped = logged(Path(config.train.run_dir) / "metrics.jsonl", "train/skipped_steps")
    assert skipped == {1: 0, 2: 1, 3: 1, 4: 1}


@pytest.mark.distributed
def test_pipeline_ranks_skip_together_when_one_stage_sees_nan(small_corpus, tmp_path):
    """pp=2: the NaN is in a gradient of stage 0 only; stage 1 must skip the same step."""
    worker = REPO / "tests" / "workers" / "pretrain.py"
    args = [*SMALL_RUN, *small_corpus_args(small_corpus), "parallel.pp=2", "train.grad_accum_steps=2",
            "train.max_steps=4", "train.run_name=pipe", *EVERY_STEP]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(worker), "--nan-at=2", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "pipe"
    saved = checkpoints(run_dir)
    assert_bitwise_equal(saved[1], saved[2])  # both stages' weights: files pp00 and pp01
    assert saved[3].adam_step == 2
    assert logged(run_dir / "metrics.jsonl", "train/skipped_steps") == {1: 0, 2: 1, 3: 0, 4: 0}


def test_the_cli_reports_divergence_in_one_line_with_status_2(small_corpus, tmp_path):
    args = [*SMALL_RUN, *small_corpus_args(small_corpus), *DIVERGING, "train.max_skipped_steps=2",
            "train.run_name=nan", *EVERY_STEP]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "trainer.pretrain", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert "training diverged: 2 steps in a row, up to step 3" in errors[0], errors[0]


# --- The DeepSpeed internals trainer/engine.py relies on (DeepSpeed 0.19.8) ---------------------------


def _tiny_engine(zero_stage: int, autocast: bool = False):
    """DeepSpeed around a 4 -> 3 linear layer with AdamW and a decaying LR (one process)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": zero_stage}, "steps_per_print": 2**31 - 1}
    if autocast:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def _backward(engine, poison: bool = False) -> None:
    loss = engine(torch.ones(2, 4)).square().sum()
    engine.backward(loss * float("nan") if poison else loss)


def _zero_state(engine) -> dict[str, torch.Tensor]:
    state = {}
    for name, param in engine.module.named_parameters():
        state[name] = safe_get_full_fp32_param(param).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{key}/{name}"] = safe_get_full_optimizer_state(param, key).clone()
    return state


def test_deepspeed_applies_every_update_in_take_model_step(cpu_topology):
    engine = _tiny_engine(zero_stage=0)
    calls, take_model_step = [], engine._take_model_step
    engine._take_model_step = lambda lr_kwargs=None: (calls.append(lr_kwargs), take_model_step(lr_kwargs))
    _backward(engine)
    engine.step()
    assert len(calls) == 1, "DeepSpeedEngine.step() no longer goes through _take_model_step: move the guard"
    assert "self._take_model_step(" in inspect.getsource(PipelineEngine._exec_optimizer_step), (
        "the pipeline engine's optimizer step no longer calls _take_model_step: move the guard")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_deepspeed_skips_a_step_whose_plain_optimizer_reports_overflow(cpu_topology, autocast):
    engine = _tiny_engine(zero_stage=0, autocast=autocast)
    assert not optimizer_checks_overflow(engine) and isinstance(engine.optimizer, torch.optim.AdamW)
    clipped, lr = [], engine.lr_scheduler.get_last_lr()
    engine.clip_fp32_gradients = lambda: clipped.append(True)
    _backward(engine)
    weights = {name: param.detach().clone() for name, param in engine.module.named_parameters()}
    for param in engine.module.parameters():
        param.grad = None  # what the guard does with non-finite gradients
    engine.optimizer.overflow = True
    engine.step()
    assert clipped == [True], "DeepSpeed no longer clips the plain optimizer with clip_fp32_gradients"
    assert engine.skipped_steps == 1, "DeepSpeed no longer counts an overflowed step in skipped_steps"
    assert engine.lr_scheduler.get_last_lr() == lr, "DeepSpeed steps the LR scheduler on an overflowed step"
    for name, param in engine.module.named_parameters():
        assert torch.equal(param.detach(), weights[name]), f"AdamW updated {name}, which had no gradient"
    assert not engine.optimizer.state, "AdamW created moments for parameters without gradients"


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_deepspeed_zero_skips_a_non_finite_gradient_norm(cpu_topology, zero_stage):
    engine = _tiny_engine(zero_stage)
    assert optimizer_checks_overflow(engine)
    _backward(engine)
    engine.step()
    before, lr = _zero_state(engine), engine.lr_scheduler.get_last_lr()
    _backward(engine, poison=True)
    engine.step()
    assert engine.optimizer.overflow and engine.skipped_steps == 1, (
        f"ZeRO-{zero_stage} no longer sets overflow on a non-finite gradient norm")
    assert engine.lr_scheduler.get_last_lr() == lr
    after = _zero_state(engine)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), f"ZeRO-{zero_stage} updated {key} with a NaN gradient"
    _backward(engine)
    engine.step()  # the NaN gradients were discarded, not carried into the next step
    assert not engine.optimizer.overflow
    assert all(torch.isfinite(t).all() for t in _zero_state(engine).values())


def test_a_checkpoint_with_a_nan_weight_is_refused_before_anything_is_written(tmp_path):
    topo = Topology(rank=0, world_size=1, local_rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                    device=torch.device("cpu"))
    weight = torch.ones(4, 3)
    state = TrainerState(step=2, tokens_seen=20, layout={"tp": 1, "pp": 1, "dp": 1}, config={})

    def shard(moment: torch.Tensor) -> ShardState:
        return ShardState({"lin.weight": weight}, {"exp_avg/lin.weight": moment, "exp_avg_sq/lin.weight": weight},
                          {"lin.weight": 0}, adam_step=2)

    save_checkpoint(tmp_path, TrainerState(1, 10, state.layout, {}), shard(weight.clone()), {}, topo, keep_last=0)
    poisoned = weight.clone()
    poisoned[1, 2] = float("inf")
    with pytest.raises(CheckpointError, match=r"step_00000002 not written: Adam moment exp_avg/lin.weight has 1 "
                                              r"NaN or infinite values \(of 12\)"):
        save_checkpoint(tmp_path, state, shard(poisoned), {}, topo, keep_last=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no step_00000002, no .tmp
