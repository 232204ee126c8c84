"""What the data pipeline reports reaches a real training run's metrics: corrupt shards skipped, counted exactly."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.prepare import load_index
from tests.conftest import SMALL_RUN, logged, small_corpus_args
from trainer.config import compose_config
from trainer.run import run

MAX_STEPS = 3


def _truncate(shard: Path) -> None:
    """Cut a shard in half, as an interrupted transfer leaves it."""
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _epoch_blocks(index: dict, seed: int, block_shards: int) -> list[list[str]]:
    """Epoch 0's blocks of training shards: index order shuffled with random.Random(seed), cut in blocks."""
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    random.Random(seed).shuffle(files)
    return [files[i : i + block_shards] for i in range(0, len(files), block_shards)]


@pytest.mark.usefixtures("one_thread")
def test_corrupt_training_shards_the_run_reads_are_counted_in_its_metrics(small_corpus, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(small_corpus, prepared)  # the session's corpus stays intact for other tests
    config = compose_config([*SMALL_RUN, *small_corpus_args(prepared), "data.prepare=never",
                             f"train.run_dir={tmp_path / 'run'}", f"train.max_steps={MAX_STEPS}"])
    data: DataConfig = config.data
    index = load_index(prepared)
    blocks = _epoch_blocks(index, data.seed, data.shuffle_block_shards)
    n_tokens = {s["file"]: s["n_tokens"] for s in index["splits"]["train"]["shards"]}
    first, last = blocks[0], blocks[-1]
    # Two of the first block's shards and one of the last block's: the run reads only the first block.
    read, unread = first[:2], last[:1]
    readable_windows = (sum(n_tokens[f] for f in first[2:]) - 1) // config.seq_len
    assert len(blocks) > 1 and readable_windows >= MAX_STEPS * config.train.micro_batch_size
    for name in (*read, *unread):
        _truncate(prepared / name)

    run(config)

    skipped = logged(Path(config.train.run_dir) / "metrics.jsonl", "data/skipped_shards")
    assert skipped == {step: len(read) for step in range(1, MAX_STEPS + 1)}
