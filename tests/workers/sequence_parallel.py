"""`trainer.pretrain` with megatron-core's sequence-parallel buffers on the CPU, for tests/test_parallel.py.

megatron-core allocates the all-gather and reduce-scatter buffers of its sequence-parallel layers with
`device=torch.cuda.current_device()`, which is why the trainer refuses sequence parallelism off CUDA. gloo
runs the same collectives on CPU tensors as NCCL does on GPU ones, so pointing that one device lookup at the
CPU lets the tests check the wiring: the model's code and megatron's are exactly those that run on CUDA.
Run under torchrun: `python -m torch.distributed.run --nproc_per_node=2 tests/workers/sequence_parallel.py
parallel.tp=2 parallel.sequence_parallel=true ...`.
"""

import runpy
import sys

import torch

torch.cuda.current_device = lambda: torch.device("cpu")

import trainer.engine  # noqa: E402

trainer.engine.sequence_parallel_supported = lambda device: True

if __name__ == "__main__":
    sys.argv = ["trainer.pretrain", *sys.argv[1:]]
    runpy.run_module("trainer.pretrain", run_name="__main__", alter_sys=True)
