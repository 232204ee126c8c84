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
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.rendezvous import free_port
from tests.conftest import SMALL_RUN, logged, small_corpus_args
from tests.workers.common import tiny_model_config
from trainer.config import ConfigError, KernelsConfig, ParallelConfig
from trainer.engine import build_model
from trainer.export import export
from trainer.model import GPT
from trainer.parallel import Topology, init_topology
from trainer.run import run

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent
STEPS = 5
RTOL = 1e-5
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


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    """The single-process run: 4 micro-batches of 4 per step."""
    from tests.conftest import compose_config

    run_dir = tmp_path_factory.mktemp("single")
    config = compose_config([*SMALL_RUN, *_data_args(small_corpus), f"train.run_dir={run_dir}",
                             f"train.max_steps={STEPS + 1}", "train.grad_accum_steps=4", "train.eval_interval=0",
                             "train.checkpoint_interval=0"])
    summary = run(config)
    return summary.train_losses, Path(summary.checkpoint)


LAYOUTS = {
    "tp2-pp2-dp2-zero1": ["nproc=8", "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1",
                          "train.grad_accum_steps=2"],
    "tp2-dp2-zero2": ["nproc=4", "parallel.tp=2", "parallel.zero_stage=2", "train.grad_accum_steps=2"],
    "tp2-dp2-zero3": ["nproc=4", "parallel.tp=2", "parallel.zero_stage=3", "train.grad_accum_steps=2"],
    "tp2-pp2": ["nproc=4", "parallel.tp=2", "parallel.pp=2", "train.grad_accum_steps=4"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_the_single_process_loss_curve(layout, reference, small_corpus, tmp_path):
    args = [*LAYOUTS[layout], *SMALL_RUN, *_data_args(small_corpus), f"train.max_steps={STEPS + 1}",
            f"train.exit_after_steps={STEPS}", "train.eval_interval=0", "train.checkpoint_interval=0",
            "train.run_name=layout"]
    result = launch(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_curve(tmp_path / "runs" / "layout", reference)


def assert_same_curve(run_dir: Path, reference) -> None:
    """Losses within RTOL of the single-process run's, and the gradient norm clipping uses within 1e-4."""
    reference_losses, reference_checkpoint = reference
    reference_norms = train_metric(reference_checkpoint.parent.parent, "train/grad_norm")
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in losses:
        assert losses[step] == pytest.approx(reference_losses[step], rel=RTOL), (step, losses, reference_losses)
    norms = train_metric(run_dir, "train/grad_norm")
    for step in norms:  # every parameter counted once, whatever the layout
        assert norms[step] == pytest.approx(reference_norms[step], rel=1e-4), (step, norms, reference_norms)
        assert norms[step] > 0.05  # above optim.grad_clip: clipping is exercised


SEQUENCE_PARALLEL = {
    "tp2-sp": (2, ["parallel.tp=2", "parallel.dp=1", "train.grad_accum_steps=4"]),
    "tp2-pp2-sp": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1", "train.grad_accum_steps=4"]),
    "tp2-dp2-zero3-sp": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=3",
                             "train.grad_accum_steps=2"]),
}


@pytest.mark.parametrize("layout", list(SEQUENCE_PARALLEL))
def test_sequence_parallelism_matches_the_single_process_loss_curve(layout, reference, small_corpus, tmp_path):
    """Megatron's sequence-parallel layers, with only their buffer device pointed at the CPU (see the worker)."""
    nproc, layout_args = SEQUENCE_PARALLEL[layout]
    args = [*layout_args, "parallel.sequence_parallel=true", *SMALL_RUN, *_data_args(small_corpus),
            f"train.max_steps={STEPS + 1}", f"train.exit_after_steps={STEPS}", "train.eval_interval=0",
            "train.checkpoint_interval=0", "train.run_name=sp"]
    worker = REPO / "tests" / "workers" / "sequence_parallel.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                             f"--master_port={free_port()}", str(worker), *args],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The norm also checks that LayerNorm and row-bias gradients are summed over both ranks' sequence chunks.
    assert_same_curve(tmp_path / "runs" / "sp", reference)


def test_save_at_one_layout_resume_at_another(reference, small_corpus, tmp_path):
    reference, reference_checkpoint = reference
    common = [*SMALL_RUN, *_data_args(small_corpus), f"train.max_steps={STEPS + 1}", "train.grad_accum_steps=4",
              "train.eval_interval=0", "train.checkpoint_interval=0", "train.run_name=moving"]
    first = launch(["nproc=2", "parallel.tp=2", "train.exit_after_steps=3", *common], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = launch(["nproc=2", "parallel.pp=2", *common], tmp_path)  # same run dir: resume=auto
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "saved at layout {'dp': 1, 'pp': 1, 'tp': 2}" in second.stdout + second.stderr
    losses = train_losses(tmp_path / "runs" / "moving")
    assert sorted(losses) == list(range(1, STEPS + 2))
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], rel=RTOL), (step, losses[step], reference[step])

    # The pipeline-saved final checkpoint exports to the same single-file model as the single-process one.
    exported = export(tmp_path / "runs" / "moving" / "checkpoints" / "step_00000006", tmp_path / "pp2.safetensors")
    expected = export(reference_checkpoint, tmp_path / "single.safetensors")
    mine, theirs = load_file(str(exported)), load_file(str(expected))
    assert sorted(mine) == sorted(theirs) and mine["embedding.tokens.weight"].shape[0] == 512
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_zero3_checkpoint_resumes_in_a_single_process(reference, small_corpus, tmp_path):
    reference, _ = reference
    from tests.conftest import compose_config

    common = [*SMALL_RUN, *_data_args(small_corpus), f"train.max_steps={STEPS + 1}", "train.eval_interval=0",
              "train.checkpoint_interval=0"]
    first = launch(["nproc=2", "parallel.zero_stage=3", "train.grad_accum_steps=2", "train.exit_after_steps=3",
                    "train.run_name=z3", *common], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    saved = tmp_path / "runs" / "z3" / "checkpoints" / "step_00000003"
    config = compose_config([*common, "train.grad_accum_steps=4", f"train.resume={saved}",
                             f"train.run_dir={tmp_path / 'single'}"])
    losses = run(config).train_losses
    assert sorted(losses) == [4, 5, 6]
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], rel=RTOL), (step, losses[step], reference[step])


def test_tp2_gradients_equal_the_gathered_single_process_gradients(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "tests.workers.tp_grads", str(tmp_path)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [torch.load(tmp_path / f"grads-tp{r}.pt", weights_only=True) for r in range(2)]
    init_topology(ParallelConfig(), "cpu")
    model = GPT(tiny_model_config(), KernelsConfig(), vocab_size=100, seed=3)
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model(idx, idx.roll(-1, dims=1)).backward()
    for name, param in model.named_parameters():
        (grad0, dim), (grad1, _) = shards[0][name], shards[1][name]
        gathered = grad0 if dim is None else torch.cat([grad0, grad1], dim=dim)
        if dim is None:
            torch.testing.assert_close(grad1, grad0, rtol=0, atol=0)  # replicas agree exactly
        torch.testing.assert_close(gathered, param.grad, rtol=1e-5, atol=1e-7, msg=name)


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


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_estimated_memory_matches_the_measured_ranks(zero_stage, small_corpus, tmp_path):
    from tests.conftest import compose_config
    from trainer.cost.memory import Layout, estimate_memory

    args = ["nproc=2", f"parallel.zero_stage={zero_stage}", "train.grad_accum_steps=2", *SMALL_RUN,
            *_data_args(small_corpus), "model.n_embd=64", "train.max_steps=2", "train.eval_interval=0",
            "train.checkpoint_interval=0", "train.run_name=memory"]
    result = launch(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "memory" / "metrics.jsonl").read_text().splitlines()]
    measured = records[-1]["summary"]["memory_per_rank"]
    config = compose_config([*SMALL_RUN, "model.n_embd=64", "train.run_dir=."])
    layout = Layout(dp=2, zero_stage=zero_stage, micro_batch=4, seq_len=32, precision="fp32", micro_batches=2)
    estimate = estimate_memory(config.model, 512, layout, config.hardware)
    for rank in measured:  # ZeRO pads partitions to alignment: a few percent of a model this small
        assert rank["params_mb"] == pytest.approx(estimate.params / 2**20, rel=0.05)
        assert rank["optimizer_mb"] == pytest.approx(estimate.optimizer / 2**20, rel=0.05)


def test_communication_is_timed_and_reported_when_behind_plan(small_corpus, tmp_path):
    args = ["nproc=2", "parallel.zero_stage=1", "train.grad_accum_steps=2", "cost.time_communication=true",
            *SMALL_RUN, *_data_args(small_corpus), "train.max_steps=3", "train.eval_interval=0",
            "train.checkpoint_interval=0", "train.run_name=comm"]
    result = launch(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    communication = train_metric(tmp_path / "runs" / "comm", "time/communication_s")
    assert sorted(communication) == [1, 2, 3] and all(seconds > 0 for seconds in communication.values())
    # A tiny model on a CPU is far below 40% MFU: the log says where the step time goes.
    assert "of which communication" in result.stdout + result.stderr


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
