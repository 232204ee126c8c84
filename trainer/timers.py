"""Wall time per phase of a training step (data wait, forward, backward, optimizer), for the cost report.

On CUDA the device is synchronised at each phase boundary, so GPU work is charged to the phase that
issued it rather than to whichever later call happens to wait for it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates seconds per named phase until `pop()`."""

    def __init__(self, device: torch.device):
        self.device = device
        self._totals: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._totals[name] += time.perf_counter() - started

    def pop(self) -> dict[str, float]:
        """The seconds per phase since the last pop."""
        totals, self._totals = dict(self._totals), defaultdict(float)
        return totals
