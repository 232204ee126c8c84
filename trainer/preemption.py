"""Stopping cleanly on a preemption warning: finish the step, checkpoint, exit with a retry status.

A scheduler warns before it takes the machines (SLURM's `--signal=USR1@120`, SIGTERM at the time limit).
The handler only records the signal; the step loop asks after every step, all ranks agree through one
tiny all-reduce (so they stop at the same step), and the run saves a checkpoint and exits with
`train.preemption_exit_code`; inside a SLURM job rank 0 first requeues the job (launch/requeue.py). The rerun
resumes from the checkpoint. The step already waits for its loss on the host, so the one-scalar all-reduce
adds a collective's latency (microseconds within a node) and no new synchronisation.

The handlers are installed before any slow start-up work (imports, data preparation, model build) and stay
until the run is over, the final checkpoint published: a signal during start-up stops the run at its next
safe point, and a second signal while a checkpoint is being written is logged, not fatal (the default
action of SIGTERM or SIGUSR1 would kill the process and leave only the checkpoint's `.tmp`). This module
imports torch only when asked, so the entry point can install the handlers before the heavy imports.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from trainer.config import parse_signals

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped early on a signal, after writing its checkpoint (if it had anything to save)."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (nothing trained yet)"
        super().__init__(f"preempted by {signal_name} at step {step}; {where}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class PreemptionWatch:
    """Records the first of the given signals; `requested()` tells every rank whether any rank got one.

    `device` is where the all-reduce's flag lives (the topology's device: NCCL needs a CUDA tensor); it is set
    once the topology exists, since the handlers go in before it."""

    def __init__(self, names: str, device=None):
        self.received: str | None = None
        self.device = device
        self._previous = {sig: signal.signal(sig, self._handle) for sig in parse_signals(names)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            log.warning("%s received: stopping at the next safe point with a checkpoint", name)
        else:  # e.g. SIGTERM at the time limit while the checkpoint for a SIGUSR1 is being written
            log.warning("%s received while already stopping for %s: noted; the checkpoint is still being "
                        "finished", name, self.received)

    def requested(self) -> bool:
        """Whether any rank received a signal (a collective: every rank must call it at the same point)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor(1.0 if self.received else 0.0, device=self.device or "cpu")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = "a signal on another rank"
        return bool(flag.item())

    def close(self) -> None:
        """Put back the handlers that were there before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
