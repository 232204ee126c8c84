"""3D parallelism on CPU with gloo: every layout draws the single-process loss curve, and resumes across layouts.

Tolerance: fp32 throughout. Tensor parallelism splits matmul reductions and all-reduces the partial sums,
ZeRO and data parallelism average gradients in another order, so losses may differ in the last bits of
fp32 (relative 1e-7 per operation); over 5 steps of a 2-layer model that stays below 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.rendezvous import free_port
from tests.conftest import SMALL_RUN, logged, small_corpus_args
from tests.workers.instruments import first_step_gradients, full_gradients, load_rank_gradients
from trainer.checkpoint import CheckpointReader
from trainer.config import ConfigError
from trainer.engine import build_model
from trainer.export import export
from trainer.parallel import Topology
from trainer.run import run

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent
STEPS = 5
RTOL = 1e-5
GRAD_RTOL = 1e-5
# A threshold the gradient norm exceeds at every step, so clipping (and the norm it uses) is exercised.
CLIP = "optim.grad_clip=0.05"


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _data_args(prepared) -> list[str]:
    return [CLIP, *small_corpus_args(prepared)]


def launch(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launch.local", *args], cwd=cwd, env=_env(),
                            capture_output=True, text=True, timeout=timeout)
    return result


def train_metric(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return logged(run_dir / "metrics.jsonl", key)


def train_losses(run_dir: Path) -> dict[int, float]:
    return train_metric(run_dir, "train/loss")


@dataclass
class Reference:
    """The single-process run every layout is compared with."""

    losses: dict[int, float]
    grad_norms: dict[int, float]
    checkpoint: Path
    # Step 1's gradient of every parameter, as the optimizer was about to use it.
    gradients: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory) -> Reference:
    """The single-process run: 4 micro-batches of 4 per step."""
    from tests.conftest import compose_config

    run_dir, grad_dir = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("single-grads")
    config = compose_config([*SMALL_RUN, *_data_args(small_corpus), f"train.run_dir={run_dir}",
                             f"train.max_steps={STEPS + 1}", "train.grad_accum_steps=4", "train.eval_interval=0",
                             "train.checkpoint_interval=0"])
    with first_step_gradients(grad_dir):
        summary = run(config)
    return Reference(summary.train_losses, train_metric(run_dir, "train/grad_norm"), Path(summary.checkpoint),
                     full_gradients(load_rank_gradients(grad_dir)))


def launch_instrumented(nproc: int, args: list[str], tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """torchrun of `trainer.pretrain` that saves step 1's gradients in tmp_path/grads and the activation shapes."""
    for folder in ("grads", "shapes"):
        (tmp_path / folder).mkdir(exist_ok=True)
    worker = REPO / "tests" / "workers" / "pretrain.py"
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
         str(worker), f"--grads-out={tmp_path / 'grads'}", f"--shapes-out={tmp_path / 'shapes'}", *flags, *args],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )


def layout_run_args(small_corpus, name: str) -> list[str]:
    return [*SMALL_RUN, *_data_args(small_corpus), f"train.max_steps={STEPS + 1}", f"train.exit_after_steps={STEPS}",
            "train.eval_interval=0", "train.checkpoint_interval=0", f"train.run_name={name}"]


# nproc, overrides, extra checks folded into the same launch (see the test).
LAYOUTS = {
    "tp2-pp2-dp2-zero1": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1",
                              "train.grad_accum_steps=2"]),
    "tp2-dp2-zero2": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=2", "train.grad_accum_steps=2",
                          "cost.time_communication=true"]),
}  # tp2-pp2 alone: in tp2-pp2-dp2-zero1 here and with sequence parallelism below; tp2-dp2 ZeRO-3: with
# sequence parallelism below (and LoRA's in test_lora.py)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_the_single_process_gradients_and_curve(layout, reference, small_corpus, tmp_path):
    nproc, layout_args = LAYOUTS[layout]
    result = launch_instrumented(nproc, [*layout_args, *layout_run_args(small_corpus, "layout")], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "layout"
    assert_same_gradients(tmp_path / "grads", reference)
    assert_same_curve(run_dir, reference)
    assert_activation_shapes(tmp_path / "shapes", nproc, sequence_chunks=1)
    if "zero_stage=2" in " ".join(layout_args) or "zero_stage=3" in " ".join(layout_args):
        assert_memory_matches_the_estimate(run_dir, small_corpus, layout_args)
    if "cost.time_communication=true" in layout_args:
        assert_communication_is_timed(run_dir, result)


def assert_same_gradients(grad_dir: Path, reference: Reference) -> None:
    """Every parameter's step-1 gradient equals the single-process one (tp shards joined, padding trimmed).

    fp32: tp and dp sum partial products in another order, so elements differ in the last bits; relative
    to the largest element of each tensor that stays below 1e-5 here, while a gradient wrong by a factor in
    any one tensor is off by tens of percent.
    """
    gradients = full_gradients(load_rank_gradients(grad_dir))
    assert sorted(gradients) == sorted(reference.gradients)
    for name, expected in reference.gradients.items():
        got = gradients[name]
        if got.shape != expected.shape:  # vocabulary padding rows (tp-dependent) carry no gradient
            assert got.shape[1:] == expected.shape[1:], name
            padding = got[expected.shape[0]:] if got.shape[0] > expected.shape[0] else None
            assert padding is None or not padding.any(), f"{name}: padding rows have gradients"
            got = got[: expected.shape[0]]
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0, atol=GRAD_RTOL * scale, msg=name)


def assert_activation_shapes(shape_dir: Path, nproc: int, sequence_chunks: int) -> None:
    """Blocks and LayerNorms see (micro-batch, T / chunks, C) on every rank: (4, 32, 32) without SP."""
    expected = [4, 32 // sequence_chunks, 32]
    for rank in range(nproc):
        seen = json.loads((shape_dir / f"shapes-rank{rank}.json").read_text())
        assert seen, f"rank {rank} recorded no activations"
        assert all(shape == expected for _, shape in seen), (rank, seen)


def assert_same_curve(run_dir: Path, reference: Reference, steps: int = STEPS) -> None:
    """Losses within RTOL of the single-process run's, and the gradient norm clipping uses within 1e-4."""
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    for step in losses:
        assert losses[step] == pytest.approx(reference.losses[step], rel=RTOL), (step, losses, reference.losses)
    norms = train_metric(run_dir, "train/grad_norm")
    for step in norms:  # every parameter counted once, whatever the layout
        expected = reference.grad_norms[step]
        assert norms[step] == pytest.approx(expected, rel=1e-4), (step, norms, reference.grad_norms)
        assert norms[step] > 0.05  # above optim.grad_clip: clipping is exercised


def assert_memory_matches_the_estimate(run_dir: Path, small_corpus, layout_args: list[str]) -> None:
    """The cost model's per-rank parameter and optimizer bytes match what each rank measured holding."""
    from tests.conftest import compose_config
    from trainer.cost.memory import Layout, estimate_memory

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = records[-1]["summary"]["memory_per_rank"]
    config = compose_config([*SMALL_RUN, *_data_args(small_corpus), *layout_args, "train.run_dir=."])
    parallel = config.parallel
    layout = Layout(tp=parallel.tp, dp=parallel.dp, zero_stage=parallel.zero_stage, micro_batch=4, seq_len=32,
                    precision="fp32", micro_batches=config.train.grad_accum_steps)
    estimate = estimate_memory(config.model, 512, layout, config.hardware)
    for rank in measured:  # ZeRO pads partitions to alignment: a few percent of a model this small
        assert rank["params_mb"] == pytest.approx(estimate.params / 2**20, rel=0.05), (rank, estimate)
        assert rank["optimizer_mb"] == pytest.approx(estimate.optimizer / 2**20, rel=0.05), (rank, estimate)


def assert_communication_is_timed(run_dir: Path, result: subprocess.CompletedProcess) -> None:
    communication = train_metric(run_dir, "time/communication_s")
    assert sorted(communication) == list(range(1, STEPS + 1)) and all(s > 0 for s in communication.values())
    # A tiny model on a CPU is far below 40% MFU: the log says where the step time goes.
    assert "of which communication" in result.stdout + result.stderr


SEQUENCE_PARALLEL = {
    "tp2-sp": (2, ["parallel.tp=2", "parallel.dp=1", "train.grad_accum_steps=4"]),
    "tp2-pp2-sp": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1", "train.grad_accum_steps=4"]),
    "tp2-dp2-zero3-sp": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=3",
                             "train.grad_accum_steps=2"]),
}


@pytest.mark.parametrize("layout", list(SEQUENCE_PARALLEL))
def test_sequence_parallelism_matches_the_single_process_gradients_and_curve(layout, reference, small_corpus,
                                                                              tmp_path):
    """Megatron's sequence-parallel layers, with only their buffer device pointed at the CPU (see the worker)."""
    nproc, layout_args = SEQUENCE_PARALLEL[layout]
    args = [*layout_args, "parallel.sequence_parallel=true", *layout_run_args(small_corpus, "sp")]
    result = launch_instrumented(nproc, args, tmp_path, "--sequence-parallel-on-cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Each tp rank holds its own half of the sequence between the tensor-parallel regions.
    assert_activation_shapes(tmp_path / "shapes", nproc, sequence_chunks=2)
    # LayerNorm and row-bias gradients must be summed over both ranks' sequence chunks.
    assert_same_gradients(tmp_path / "grads", reference)
    assert_same_curve(tmp_path / "runs" / "sp", reference)


def test_save_at_one_layout_resume_at_another(reference, small_corpus, tmp_path):
    """pp=2 for 3 steps, then tp=2, with a vocabulary padding that depends on tp (600 rows, then 720)."""
    reference_checkpoint, reference = reference.checkpoint, reference.losses
    common = [*SMALL_RUN, *_data_args(small_corpus), f"train.max_steps={STEPS + 1}", "train.grad_accum_steps=4",
              "train.eval_interval=0", "train.checkpoint_interval=0", "train.run_name=moving",
              "model.pad_vocab_to_multiple=120"]  # 512 tokens: 600 rows at tp=1, 720 at tp=2
    first = launch(["nproc=2", "parallel.pp=2", "train.exit_after_steps=3", *common], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = launch(["nproc=2", "parallel.tp=2", *common], tmp_path)  # same run dir: resume=auto
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "saved at layout {'dp': 1, 'pp': 2, 'tp': 1}" in second.stdout + second.stderr
    losses = train_losses(tmp_path / "runs" / "moving")
    assert sorted(losses) == list(range(1, STEPS + 2))
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], rel=RTOL), (step, losses[step], reference[step])

    # The tp=2 final checkpoint holds 720 padded rows; the export holds the 512 real ones, and equals the
    # single-process model (saved with 512 rows: no padding at the default multiple).
    checkpoint = tmp_path / "runs" / "moving" / "checkpoints" / "step_00000006"
    saved_rows = CheckpointReader(checkpoint).read("embedding.tokens.weight").shape[0]
    assert saved_rows == 720
    exported = export(checkpoint, tmp_path / "tp2.safetensors")
    expected = export(reference_checkpoint, tmp_path / "single.safetensors")
    mine, theirs = load_file(str(exported)), load_file(str(expected))
    assert sorted(mine) == sorted(theirs) and mine["embedding.tokens.weight"].shape[0] == 512
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_zero3_resumes_from_and_into_other_layouts(reference, small_corpus, tmp_path):
    """One process for 2 steps, ZeRO-3 over dp=2 for 2 more, one process again for the last 2."""
    from tests.conftest import compose_config

    reference = reference.losses
    common = [*SMALL_RUN, *_data_args(small_corpus), f"train.max_steps={STEPS + 1}", "train.eval_interval=0",
              "train.checkpoint_interval=0"]
    single = [*common, "train.grad_accum_steps=4", f"train.run_dir={tmp_path / 'runs' / 'z3'}"]
    losses = dict(run(compose_config([*single, "train.exit_after_steps=2"])).train_losses)
    zero3 = launch(["nproc=2", "parallel.zero_stage=3", "train.grad_accum_steps=2", "train.exit_after_steps=2",
                    "train.run_name=z3", *common], tmp_path)  # resume=auto from the single-process step 2
    assert zero3.returncode == 0, zero3.stdout[-3000:] + zero3.stderr[-3000:]
    assert "saved at layout {'dp': 1, 'pp': 1, 'tp': 1}" in zero3.stdout + zero3.stderr
    losses.update(train_losses(tmp_path / "runs" / "z3"))
    losses.update(run(compose_config(single)).train_losses)  # resumes from ZeRO-3's step 4
    assert sorted(losses) == list(range(1, STEPS + 2))
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], rel=RTOL), (step, losses[step], reference[step])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nproc=3", "parallel.tp=2"], "nproc=3: must be a multiple of parallel.tp*pp = 2*1"),
        (["nproc=4", "parallel.pp=2", "parallel.zero_stage=2", "train.grad_accum_steps=2"], "ZeRO 0 or 1 only"),
        (["nproc=3", "parallel.tp=3"], "parallel.tp=3: must divide model.n_head=4"),
        (["nproc=2", "parallel.pp=2"], "at least as many micro-batches as stages"),
        (["nproc=2", "parallel.dp=1"], "nproc=2 but parallel.tp*pp*dp = 1*1*1 = 1"),
        (["nproc=2", "parallel.offload_optimizer=true"], "parallel.offload_optimizer=True: needs parallel.zero_stage"),
    ],
)
def test_bad_layouts_fail_before_any_process_starts(args, message, tmp_path):
    result = launch(args, tmp_path, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr[-2000:]
    assert "starting" not in result.stderr


def test_world_size_that_does_not_match_the_layout_is_named(small_corpus, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "trainer.pretrain", "parallel.tp=2", "parallel.dp=2", *SMALL_RUN, *_data_args(small_corpus)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "parallel.tp*pp*dp = 2*1*2 = 4 but the job has 2 processes" in result.stdout + result.stderr


def test_sequence_parallel_is_refused_on_the_cpu(small_run):
    config = small_run("parallel.tp=2", "parallel.sequence_parallel=true")
    topo = Topology(rank=0, world_size=2, local_rank=0, tp=2, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                    device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="sequence_parallel=true needs CUDA"):
        build_model(config, 512, topo)


def test_a_dead_rank_stops_the_whole_job_and_is_named(small_corpus, tmp_path):
    import psutil

    args = [sys.executable, "-m", "launch.local", "nproc=2", "parallel.zero_stage=1", "train.grad_accum_steps=2",
            *SMALL_RUN, *_data_args(small_corpus), "train.max_steps=100000", "train.eval_interval=0",
            "train.checkpoint_interval=0", "train.run_name=dies", "cluster.collective_timeout_s=30"]
    job = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    metrics = tmp_path / "runs" / "dies" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
             if "trainer.pretrain" in " ".join(p.cmdline()) and p.environ().get("LOCAL_RANK") == "1"]
    assert len(ranks) == 1, "rank 1 not found"
    ranks[0].kill()
    killed = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed < 60  # the surviving rank does not hang on its next collective
    # torchrun names the rank that failed first, and how.
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\).*?SIGKILL", output, re.S), output[-3000:]
    # The surviving rank says in one line that it lost its peer, not with a gloo traceback.
    assert "rank 0/2: a collective failed" in output and "Another rank has likely died" in output, output[-3000:]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=2", "model.n_head=4", "model.block_size=33"], "must divide the sequence length 33"),
        (["parallel.tp=2", "model.dropout=0.1"], "needs model.dropout=0 (it is 0.1)"),
        (["parallel.tp=1"], "needs parallel.tp > 1"),
    ],
)
def test_sequence_parallel_layouts_that_cannot_work_are_named(overrides, message, small_run):
    with pytest.raises(ConfigError, match=re.escape(message)):
        small_run("parallel.sequence_parallel=true", *overrides)
