"""`trainer.pretrain` (in-process or under torchrun) with a NaN put into one gradient at chosen steps.

The NaN goes into one element of the first parameter's gradient on the first pipeline stage, as autograd
hands it over and before DeepSpeed reduces or partitions it, so the other ranks can learn of it only from
the global gradient norm.

`python -m torch.distributed.run --nproc_per_node=2 tests/workers/nonfinite.py --nan-at=3,4 parallel.pp=2 ...`
"""

from __future__ import annotations

import contextlib
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script by torchrun

import trainer.engine  # noqa: E402


def _poisoned(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad.view(-1)[0] = float("nan")
    return grad


@contextlib.contextmanager
def nan_gradient_at(steps: set[int]) -> Iterator[None]:
    """Every Engine built inside poisons one gradient during the steps in `steps` (counted from 1 per process)."""
    original_init, original_step = trainer.engine.Engine.__init__, trainer.engine.Engine.train_step

    def init(engine, *args, **kwargs):
        original_init(engine, *args, **kwargs)
        engine.steps_begun = 0
        if engine.topo.pp_rank == 0:
            first = next(engine.module.parameters())
            first.register_hook(lambda grad: _poisoned(grad) if engine.steps_begun in steps else grad)

    def train_step(engine, batches):
        engine.steps_begun += 1
        return original_step(engine, batches)

    trainer.engine.Engine.__init__, trainer.engine.Engine.train_step = init, train_step
    try:
        yield
    finally:
        trainer.engine.Engine.__init__, trainer.engine.Engine.train_step = original_init, original_step


def main(argv: list[str]) -> None:
    flags = [arg for arg in argv if arg.startswith("--nan-at=")]
    steps = {int(step) for flag in flags for step in flag.removeprefix("--nan-at=").split(",")}
    sys.argv = ["trainer.pretrain", *(arg for arg in argv if arg not in flags)]
    with nan_gradient_at(steps):
        runpy.run_module("trainer.pretrain", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
