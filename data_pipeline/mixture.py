"""MixtureStream: training batches drawn from several prepared corpora with given weights, with exact resume.

The choice is per batch: each next() draws one component with probability weight / sum(weights) and returns
that component's next batch. Per batch rather than per row because then every component stays an ordinary
TokenStream (its own position, packing and dp slicing) and the mixture adds one draw per batch; the price is
gradient quality: a micro-batch holds one corpus, so a step's composition is averaged over its
micro-batches (gradient accumulation) and steps only, Binomial(micro-batches, weight) around the weights. The
draws come from one seeded numpy generator, the same on every dp rank, so in global mode all ranks take the
same component for a global micro-step and the mixture keeps that mode's layout independence; in shards mode
every rank has taken each component equally often, so rank 0's state fits every rank. The state is the
generator's state, the per-component batch counts and each component's own state. A component may be a
StreamLoader, whose DataLoader workers read ahead for it; its state is exact after the batches taken here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

MIXTURE_STATE_VERSION = 1
_SEED_MASK = (1 << 64) - 1
_MIXTURE_STREAM = 0x6D6978  # "mix": keeps the mixture's draws apart from other generators of the same seed


class MixtureStream:
    """Iterator of (inputs, targets) batches, each from one of `streams` drawn with probability ~ weights."""

    def __init__(self, streams: Sequence, weights: Sequence[float], seed: int) -> None:
        if not streams or len(streams) != len(weights):
            raise ValueError(
                f"MixtureStream needs one weight per stream, got {len(streams)} and {len(weights)}"
            )
        if not all(w > 0 and math.isfinite(w) for w in weights):
            raise ValueError(f"MixtureStream weights must be finite and > 0, got {list(weights)}")
        shapes = {(getattr(s, "seq_len", None), getattr(s, "micro_batch_size", None)) for s in streams}
        if len(shapes) != 1:
            raise ValueError(
                f"MixtureStream streams must share seq_len and micro_batch_size, got {sorted(shapes)}"
            )
        self.streams, self.weights, self.seed = list(streams), [float(w) for w in weights], seed
        self._p = np.array(self.weights) / sum(self.weights)
        self._rng = np.random.default_rng([seed & _SEED_MASK, _MIXTURE_STREAM])
        self.counts = [0] * len(streams)  # batches taken from each component

    def __iter__(self) -> MixtureStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of the drawn component; StopIteration when that component ends (loop=False)."""
        j = int(self._rng.choice(len(self.streams), p=self._p))
        batch = next(self.streams[j])
        self.counts[j] += 1
        return batch

    def close(self) -> None:
        """Stop the components' DataLoader workers, if they have any."""
        for stream in self.streams:
            if hasattr(stream, "close"):
                stream.close()

    def state_dict(self) -> dict:
        """JSON-serialisable: the generator's state, the batches per component and each component's state."""
        return {
            "version": MIXTURE_STATE_VERSION,
            "kind": "mixture",
            "seed": self.seed,
            "weights": self.weights,
            "rng": self._rng.bit_generator.state,
            "counts": list(self.counts),
            "components": [s.state_dict() for s in self.streams],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of a mixture with the same seed, weights and component streams."""
        if state.get("version") != MIXTURE_STATE_VERSION or state.get("kind") != "mixture":
            raise ValueError(
                f"MixtureStream state version {state.get('version')!r} kind {state.get('kind')!r}, expected "
                f"version {MIXTURE_STATE_VERSION} kind 'mixture' (a single-corpus state cannot start a mixture)"
            )
        for key, mine in (("seed", self.seed), ("weights", self.weights)):
            if state.get(key) != mine:
                raise ValueError(
                    f"MixtureStream state was saved with {key}={state.get(key)!r}, this one has {mine!r}"
                )
        components = state["components"]
        if len(components) != len(self.streams):
            raise ValueError(
                f"MixtureStream state has {len(components)} components, this one {len(self.streams)}"
            )
        for i, (stream, saved) in enumerate(zip(self.streams, components, strict=True)):
            try:
                stream.load_state_dict(saved)
            except ValueError as err:
                raise ValueError(f"MixtureStream component {i}: {err}") from None
        self._rng.bit_generator.state = state["rng"]
        self.counts = [int(c) for c in state["counts"]]
