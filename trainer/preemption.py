"""Stopping cleanly on a preemption warning: finish the step, checkpoint, exit with a retry status.

A scheduler warns before it takes the machines (SLURM's `--signal=USR1@120`, SIGTERM at the time limit).
The handler only records the signal; the step loop asks after every step, all ranks agree through one
tiny all-reduce (so they stop at the same step), and the run saves a checkpoint and exits with
`train.preemption_exit_code`; inside a SLURM job rank 0 first requeues the job (launch/requeue.py). The rerun
resumes from the checkpoint. The step already waits for its loss on the host, so the one-scalar all-reduce
adds a collective's latency (microseconds within a node) and no new synchronisation.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

from trainer.config import parse_signals

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped early on a signal, after writing its checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        super().__init__(f"preempted by {signal_name} at step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class PreemptionWatch:
    """Records the first of the given signals; `requested()` tells every rank whether any rank got one."""

    def __init__(self, names: str, device: torch.device):
        self.received: str | None = None
        self._device = device
        self._previous = {sig: signal.signal(sig, self._handle) for sig in parse_signals(names)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: stopping after this step with a checkpoint", self.received)

    def requested(self) -> bool:
        flag = torch.tensor(1.0 if self.received else 0.0, device=self._device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = "a signal on another rank"
        return bool(flag.item())

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
