"""Shared test fixtures: environment for CPU runs, a small prepared corpus, composed configs."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before any
# @triton.jit function is defined, i.e. before kernels/ is imported.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.prepare import prepare  # noqa: E402
from data_pipeline.prepare_sft import SFTOptions, prepare_sft  # noqa: E402
from trainer.config import Config, compose_config  # noqa: E402

# A model and batch small enough that a training step takes milliseconds on the CPU.
SMALL_RUN = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.micro_batch_size=4", "train.eval_batches=2", "train.log_interval=1",
    "train.progress_bar=false", "logging.wandb=false", "optim.warmup_steps=2",
]  # fmt: skip


def logged(metrics: Path, key: str = "train/loss") -> dict[int, float]:
    """{step: value} of `key` in a run's metrics.jsonl; empty while the run has logged nothing yet."""
    if not metrics.is_file():
        return {}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in records if key in r}


def small_corpus_args(prepared: Path) -> list[str]:
    """The data overrides that match `small_corpus`, so training reuses it rather than preparing again."""
    return [f"data.prepared_dir={prepared}", "model.vocab_size=512", "data.max_corpus_mb=1.0",
            "data.shard_max_tokens=20000", "data.val_fraction=0.1"]


@pytest.fixture(scope="module")
def cpu_topology():
    """A one-process gloo group and megatron-core's parallel_state at tp=pp=dp=1, one intra-op thread.

    The tensors are tiny, and on a loaded 2-core machine two spinning OpenMP threads made a 30-step
    training test take 3-15 s instead of 0.15 s. The process group stays up after teardown so that later
    tests in this process can reuse it.
    """
    import torch

    from trainer.config import ParallelConfig
    from trainer.parallel import init_topology, shutdown_topology

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield init_topology(ParallelConfig(), "cpu")
    shutdown_topology()
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Run a test of tiny tensors on one intra-op thread (a second only spins on a loaded machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A ~1 MB slice of the standard library, prepared once with a 512-token vocabulary."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(DataConfig(source="stdlib", prepared_dir=str(out), vocab_size=512, max_corpus_mb=1.0,
                       shard_max_tokens=20_000, val_fraction=0.1))
    return out


@pytest.fixture
def small_run(small_corpus, tmp_path):
    """Build a validated Config for a tiny run in tmp_path on the small corpus."""

    def build(*overrides: str) -> Config:
        return compose_config([
            *SMALL_RUN, *small_corpus_args(small_corpus), f"train.run_dir={tmp_path / 'run'}", *overrides,
        ])

    return build


WORDS = "x y z i j k n def if for in is not and or return".split()  # a token or two each


def write_records(path: Path, count: int, seed: int = 0) -> Path:
    """Prompt/response records: prompts of 1-6 words, responses of 1-10, so valid-token counts vary widely
    (and two or three samples share a 32-token row)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
        response = " ".join(rng.choices(WORDS, k=rng.randint(1, 10)))
        lines.append(json.dumps({"prompt": prompt, "response": response}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def sft_data(small_corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    records = write_records(root / "records.jsonl", 240)
    out = root / "prepared"
    prepare_sft(SFTOptions(sources=[str(records)], out=str(out), tokenizer=str(small_corpus / "tokenizer.json"),
                           max_length=33, val_fraction=0.2))
    return out
