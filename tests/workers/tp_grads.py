"""Worker for test_parallel: one forward/backward of the GPT at the job's tp size; saves this rank's grads."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from tests.workers.common import tiny_model_config  # noqa: E402
from trainer.config import KernelsConfig, ParallelConfig  # noqa: E402
from trainer.model import GPT  # noqa: E402
from trainer.parallel import init_topology  # noqa: E402
from trainer.sharded_state import partition_dim  # noqa: E402


def main(out_dir: str) -> None:
    tp = int(os.environ["WORLD_SIZE"])
    topo = init_topology(ParallelConfig(tp=tp), "cpu")
    model = GPT(tiny_model_config(), KernelsConfig(), vocab_size=100, seed=3)
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model(idx, idx.roll(-1, dims=1)).backward()
    grads = {name: (p.grad.clone(), partition_dim(p)) for name, p in model.named_parameters()}
    torch.save(grads, os.path.join(out_dir, f"grads-tp{topo.tp_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
