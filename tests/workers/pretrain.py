"""`trainer.pretrain` under torchrun with the test instruments of `tests/workers/instruments.py`.

Flags before the Hydra overrides:
- `--grads-out=DIR`: every rank saves its first optimizer step's gradients to DIR/grads-rank{rank}.pt;
- `--shapes-out=DIR`: every rank writes the shapes entering its blocks and LayerNorms to DIR/shapes-rank{rank}.json;
- `--nan-at=3,4`: a NaN in one gradient at those steps (see `nan_gradient_at`);
- `--sequence-parallel-on-cpu`: lets megatron-core's sequence-parallel layers run on the CPU. They allocate
  their all-gather and reduce-scatter buffers on `torch.cuda.current_device()`, which is why the trainer
  refuses sequence parallelism off CUDA; gloo runs the same collectives on CPU tensors as NCCL does on GPU
  ones, so pointing that one device lookup at the CPU checks the wiring with the code that runs on CUDA.

`python -m torch.distributed.run --nproc_per_node=2 tests/workers/pretrain.py --grads-out=g parallel.tp=2 ...`
"""

import contextlib
import os
import runpy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script by torchrun

from tests.workers.instruments import activation_shapes, first_step_gradients, nan_gradient_at  # noqa: E402


def main(argv: list[str]) -> None:
    flags = [arg for arg in argv if arg.startswith("--")]
    overrides = [arg for arg in argv if not arg.startswith("--")]
    rank = os.environ.get("RANK", "0")
    with contextlib.ExitStack() as instruments:
        for flag in flags:
            name, _, value = flag.partition("=")
            if name == "--grads-out":
                instruments.enter_context(first_step_gradients(Path(value)))
            elif name == "--shapes-out":
                instruments.enter_context(activation_shapes(Path(value) / f"shapes-rank{rank}.json"))
            elif name == "--nan-at":
                instruments.enter_context(nan_gradient_at({int(step) for step in value.split(",")}))
            elif name == "--sequence-parallel-on-cpu":
                _sequence_parallel_on_cpu()
            else:
                raise SystemExit(f"unknown flag {flag}")
        sys.argv = ["trainer.pretrain", *overrides]
        try:
            runpy.run_module("trainer.pretrain", run_name="__main__", alter_sys=True)
        except SystemExit as stop:  # Hydra's main exits; the instruments still write what they saw
            if stop.code not in (0, None):
                raise


def _sequence_parallel_on_cpu() -> None:
    import trainer.engine

    torch.cuda.current_device = lambda: torch.device("cpu")
    trainer.engine.sequence_parallel_supported = lambda device: True


if __name__ == "__main__":
    main(sys.argv[1:])
